//! The gRPC contract between the Trellis controller and trellis-proxy (tonic + prost).
//!
//! The contract itself, every message and field, is documented in
//! `proto/trellis/proxy/v1/proxy.proto`; this crate compiles it (with `protox`, so no system
//! `protoc` is needed) into prost messages and tonic clients/servers under [`v1`]:
//!
//! * `Destinations.Watch(target)` streams a [`v1::DestinationUpdate`]: a complete
//!   [`v1::DestinationProfile`] (protocol, HTTP routes, weighted backends and their endpoints),
//!   a [`v1::NotFound`] answer, or an [`v1::EndpointsDelta`] (endpoints added/removed).
//! * `Inbound.Watch(workload, port)` streams the complete [`v1::InboundPolicy`] of a port.
//! * `Identity.Certify(CSR, proof)` returns a certificate chain, its expiry and the trust anchors.
//!
//! Every streamed message carries an opaque `version`. The [`authority`] module holds the one
//! authority normalization both the controller and the proxy use, so that `web.shop`,
//! `web.shop.svc.cluster.local:80`, `web.shop.svc.cluster.local.` and friends name one destination.
//! The [`spiffe`] module holds the one spelling of workload identities. The [`policy`] module
//! converts the resilience policy (`trellis-policy`, the TrafficPolicy kind) to and from its
//! typed messages ([`v1::DestinationPolicy`], [`v1::RoutePolicy`], [`v1::InboundRateLimit`]);
//! the [`jwt`] module the inbound side's JWT authentication (`trellis-jwt`) to and from
//! [`v1::JwtPolicy`] and [`v1::ClaimMatch`].

pub mod authority;
pub mod jwt;
pub mod policy;
pub mod spiffe;

/// Generated messages, clients (`*_client`) and servers (`*_server`) of `trellis.proxy.v1`.
#[allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic
)]
pub mod v1 {
    tonic::include_proto!("trellis.proxy.v1");

    impl std::fmt::Debug for CertifyRequest {
        // Hand-written so the proof (a bearer token) never reaches a log.
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("CertifyRequest")
                .field("identity", &self.identity)
                .field("csr_der_len", &self.csr_der.len())
                .field("proof", &"<redacted>")
                .finish()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::v1::CertifyRequest;

    #[test]
    fn certify_request_debug_hides_the_proof() {
        let req = CertifyRequest {
            identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
            csr_der: vec![1, 2, 3],
            proof: b"very-secret-token".to_vec(),
        };
        let shown = format!("{req:?}");
        assert!(!shown.contains("very-secret-token"), "{shown}");
        assert!(!shown.contains("118, 101, 114"), "{shown}");
        assert!(shown.contains("redacted"));
    }
}
