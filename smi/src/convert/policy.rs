//! TrafficPolicy: its one version to and from the model (nothing to keep aside).

use crate::api::policy::{RouteSection, v1alpha1};
use crate::model::{PolicyRoute, TrafficPolicy};

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
