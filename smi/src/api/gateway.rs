//! `policy.trellis.io` Gateway, v1alpha1: Trellis's own kind, the ingress gateway's
//! configuration (listeners, certificates by SNI, host and path routes into the mesh).
//!
//! The field types are [`trellis_gateway`]'s, shared with the proxy that serves a Gateway (which
//! may not depend on this crate): this module only wraps them in the CRD, whose schema is derived
//! from them. The spec's top-level fields are listed again here because the `CustomResource`
//! derive must sit on a struct of this crate; [`From`] both ways destructures every field, so a
//! field added on one side and not the other does not compile.
//!
//! A Gateway is not a [`crate::model::Kind`]: the controller does not consume it (the gateway
//! proxy reads its document, `trellis-proxy --gateway FILE`), so the policy sources do not watch
//! it. [`crate::load`] checks Gateway documents ([`crate::load::LoadReport::gateways`]) so that
//! `trellis validate` reports their errors with file, line and field like any other kind's.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use trellis_gateway::{Certificate, Listener, Route};

pub mod v1alpha1 {
    //! Gateway v1alpha1 (the only, stored, version).
    use super::*;
    use kube_derive::CustomResource;

    #[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
    #[kube(
        group = "policy.trellis.io",
        version = "v1alpha1",
        kind = "Gateway",
        namespaced
    )]
    #[kube(
        crates(kube_core = "::kube_core", schemars = "::schemars"),
        derive = "PartialEq",
        shortname = "tgw",
        doc = "The ingress gateway's configuration: public listeners, the certificates chosen by SNI, and the host and path routes into mesh services (trellis-proxy --gateway FILE reads it; trellis install --gateway deploys one)."
    )]
    #[kube(printcolumn(
        name = "HTTPS",
        type_ = "integer",
        description = "The HTTPS listener's port.",
        json_path = ".spec.https.port"
    ))]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct GatewaySpec {
        /// The HTTPS listener: TLS terminated with the certificate the client's SNI names.
        pub https: Listener,
        /// A plain HTTP listener redirecting every request to HTTPS.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub http_redirect: Option<Listener>,
        /// The certificates and the host names each serves.
        pub certificates: Vec<Certificate>,
        /// Which mesh service serves each host and path prefix (longest prefix wins).
        pub routes: Vec<Route>,
        /// End-user JWT authentication of every request (an inbound policy's `jwt` fields).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(schema_with = "any_object")]
        pub jwt: Option<trellis_jwt::JwtPolicy>,
    }

    /// `jwt` in the schema: an object kept as written, whose fields `trellis validate` and the
    /// gateway check (trellis-jwt owns them).
    fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "object",
            "nullable": true,
            "x-kubernetes-preserve-unknown-fields": true,
            "description": "End-user JWT authentication (providers, required), as in an inbound policy's jwt.",
        })
    }

    impl From<GatewaySpec> for trellis_gateway::GatewaySpec {
        fn from(spec: GatewaySpec) -> Self {
            let GatewaySpec {
                https,
                http_redirect,
                certificates,
                routes,
                jwt,
            } = spec;
            trellis_gateway::GatewaySpec {
                https,
                http_redirect,
                certificates,
                routes,
                jwt,
            }
        }
    }

    impl From<trellis_gateway::GatewaySpec> for GatewaySpec {
        fn from(spec: trellis_gateway::GatewaySpec) -> Self {
            let trellis_gateway::GatewaySpec {
                https,
                http_redirect,
                certificates,
                routes,
                jwt,
            } = spec;
            GatewaySpec {
                https,
                http_redirect,
                certificates,
                routes,
                jwt,
            }
        }
    }
}
