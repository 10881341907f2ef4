//! `policy.trellis.io` ExternalService, v1alpha1: Trellis's own kind, not part of SMI.
//!
//! An ExternalService declares, once for the mesh, a destination outside it: the DNS names it
//! is called by (`hosts`), the ports it is called on and how each is carried, optionally the
//! trust anchors of TLS the caller's proxy originates and fixed addresses, and which workloads
//! may call it (`sources`, service accounts as in a TrafficTarget). The controller answers a
//! proxy asking about a declared host with a profile whose `external` section the proxy
//! enforces (see `trellis_controller_core::index::external`).
//!
//! ```yaml
//! apiVersion: policy.trellis.io/v1alpha1
//! kind: ExternalService
//! metadata: {name: payments, namespace: shop}
//! spec:
//!   hosts: [api.pay.example]
//!   ports:
//!   - {port: 443, protocol: tls}                              # the application's own TLS
//!   - {port: 80, protocol: http, originateTls: {port: 443}}   # plaintext in, TLS out to :443
//!   caBundle: "-----BEGIN CERTIFICATE-----..."   # optional: trust anchors for originateTls
//!   addresses: [203.0.113.7]                     # optional: fixed endpoints instead of DNS
//!   sources:
//!   - {kind: ServiceAccount, name: checkout, namespace: shop}
//!   # or every workload of the mesh (any caller with a mesh identity):
//!   # - {kind: ServiceAccount, name: "*", namespace: "*"}
//! ```
//!
//! Port protocols:
//! - `tls`: the application speaks TLS itself; the proxy passes the bytes through (opaque TCP)
//!   and knows the host from the SNI. `originateTls` is refused on it (TLS in TLS).
//! - `http`: the application speaks plaintext HTTP; with `originateTls` the proxy connects with
//!   TLS to the given port (SNI and certificate name = the host), else in plaintext.
//! - `tcp`: opaque bytes with no name in them: reached through a proxy upstream that names
//!   `host:port`, or by a fixed address; a transparent connection carries no name to recognize
//!   it by.
//!
//! Like TrafficPolicy, the CRD's schema is generated from these types (schemars, made
//! structural by kube); see [`crate::crd`]. What the schema cannot say (DNS names, PEM, ports
//! used twice) is checked by [`crate::validate`].

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How one port of an ExternalService is carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExternalProtocol {
    /// The application's own TLS, passed through; the host is read from the SNI.
    Tls,
    /// Plaintext HTTP from the application (TLS to the server with `originateTls`).
    Http,
    /// Opaque bytes (no name to recognize a transparent connection by).
    Tcp,
}

impl ExternalProtocol {
    /// The name as written (`tls`).
    pub fn as_str(self) -> &'static str {
        match self {
            ExternalProtocol::Tls => "tls",
            ExternalProtocol::Http => "http",
            ExternalProtocol::Tcp => "tcp",
        }
    }
}

/// TLS the caller's proxy originates towards the server.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OriginateTls {
    /// The server's TLS port the proxy connects to.
    pub port: u16,
}

/// One port the ExternalService is called on.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalPort {
    /// The port the application calls.
    pub port: u16,
    /// `tls`, `http` or `tcp`.
    pub protocol: ExternalProtocol,
    /// Only on `http` ports: the proxy speaks TLS to the server on this port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub originate_tls: Option<OriginateTls>,
}

impl ExternalPort {
    /// The server port connections go to (the `originateTls` port, else the port itself).
    pub fn target_port(&self) -> u16 {
        self.originate_tls.as_ref().map_or(self.port, |t| t.port)
    }
}

/// A workload allowed to call the ExternalService (as a TrafficTarget source), or every workload
/// of the mesh: `{kind: ServiceAccount, name: "*", namespace: "*"}` (any caller with a mesh
/// identity, never one without; [`crate::model::Identity::is_anyone`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalSource {
    /// `ServiceAccount`.
    pub kind: String,
    /// The service account's name (`*` with namespace `*`: every workload of the mesh).
    pub name: String,
    /// The service account's namespace (absent: the ExternalService's; `*` with name `*`:
    /// every workload of the mesh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

pub mod v1alpha1 {
    //! ExternalService v1alpha1 (the only, stored, version).
    use super::*;
    use kube_derive::CustomResource;

    #[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
    #[kube(
        group = "policy.trellis.io",
        version = "v1alpha1",
        kind = "ExternalService",
        namespaced
    )]
    #[kube(
        crates(kube_core = "::kube_core", schemars = "::schemars"),
        derive = "PartialEq",
        shortname = "extsvc",
        doc = "A destination outside the mesh, declared once: its host names, ports (TLS passthrough, HTTP with optional TLS origination, opaque TCP), optional fixed addresses, and the service accounts allowed to call it."
    )]
    #[kube(printcolumn(
        name = "Hosts",
        type_ = "string",
        description = "The DNS names the service is called by.",
        json_path = ".spec.hosts"
    ))]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct ExternalServiceSpec {
        /// Exact DNS names the service is called by, lower case. A name the mesh reads as one of
        /// its own services (one or two labels, `*.svc.<domain>`, `*.consul`) is reported and
        /// not served: the mesh service wins.
        pub hosts: Vec<String>,
        /// The ports it is called on, each once.
        pub ports: Vec<ExternalPort>,
        /// PEM certificates the server's chain must verify to when the proxy originates TLS
        /// (absent: the system's roots).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub ca_bundle: Option<String>,
        /// Fixed IP addresses to connect to instead of resolving the host.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub addresses: Vec<String>,
        /// The service accounts allowed to call it (at least one; `{kind: ServiceAccount, name:
        /// "*", namespace: "*"}` admits every workload of the mesh).
        pub sources: Vec<ExternalSource>,
    }
}
