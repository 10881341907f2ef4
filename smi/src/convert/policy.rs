//! Trellis's own kinds, TrafficPolicy and ExternalService: their one version to and from the
//! model (nothing to keep aside).

use crate::api::external;
use crate::api::policy::{RouteSection, v1alpha1};
use crate::model::{Identity, PolicyRoute, TrafficPolicy};

pub(super) fn from_v1alpha1(o: &v1alpha1::TrafficPolicy) -> TrafficPolicy {
    TrafficPolicy {
        metadata: o.metadata.clone(),
        target_ref: o.spec.target_ref.clone(),
        policy: o.spec.policy(),
        routes: o
            .spec
            .routes
            .iter()
            .map(|r| PolicyRoute {
                http_route_group: r.http_route_group.clone(),
                matches: r.matches.clone(),
                policy: r.policy(),
                claims: r.claims.clone(),
            })
            .collect(),
        jwt: o.spec.jwt.clone(),
        claims: o.spec.claims.clone(),
    }
}

pub(super) fn to_v1alpha1(m: &TrafficPolicy) -> v1alpha1::TrafficPolicy {
    let mut spec = v1alpha1::TrafficPolicySpec::new(
        m.target_ref.clone(),
        m.policy.clone(),
        m.routes
            .iter()
            .map(|r| RouteSection {
                claims: r.claims.clone(),
                ..RouteSection::new(
                    r.http_route_group.clone(),
                    r.matches.clone(),
                    r.policy.clone(),
                )
            })
            .collect(),
    );
    spec.jwt = m.jwt.clone();
    spec.claims = m.claims.clone();
    let mut object =
        v1alpha1::TrafficPolicy::new(m.metadata.name.as_deref().unwrap_or_default(), spec);
    object.metadata = m.metadata.clone();
    object
}

/// ExternalService v1alpha1 into the model (its one version: nothing to keep aside).
pub(super) fn external_from_v1alpha1(
    o: &external::v1alpha1::ExternalService,
) -> crate::model::ExternalService {
    crate::model::ExternalService {
        metadata: o.metadata.clone(),
        hosts: o.spec.hosts.clone(),
        ports: o.spec.ports.clone(),
        ca_bundle: o.spec.ca_bundle.clone(),
        addresses: o.spec.addresses.clone(),
        sources: o
            .spec
            .sources
            .iter()
            .map(|s| Identity {
                kind: s.kind.clone(),
                name: s.name.clone(),
                namespace: s.namespace.clone(),
            })
            .collect(),
    }
}

/// The model as ExternalService v1alpha1.
pub(super) fn external_to_v1alpha1(
    m: &crate::model::ExternalService,
) -> external::v1alpha1::ExternalService {
    let spec = external::v1alpha1::ExternalServiceSpec {
        hosts: m.hosts.clone(),
        ports: m.ports.clone(),
        ca_bundle: m.ca_bundle.clone(),
        addresses: m.addresses.clone(),
        sources: m
            .sources
            .iter()
            .map(|s| external::ExternalSource {
                kind: s.kind.clone(),
                name: s.name.clone(),
                namespace: s.namespace.clone(),
            })
            .collect(),
    };
    let mut object = external::v1alpha1::ExternalService::new(
        m.metadata.name.as_deref().unwrap_or_default(),
        spec,
    );
    object.metadata = m.metadata.clone();
    object
}
