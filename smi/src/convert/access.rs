//! TrafficTarget: every version to and from [`model::AccessPolicy`].

use super::ConvertError;
use super::annotations::{self, ACCESS_DESTINATION_PORT, ACCESS_RULES};
use crate::api::access::{
    LegacyRuleKind, PortDestination, Rule, RuleKind, Subject, v1alpha1, v1alpha2, v1alpha3,
};
use crate::model::{self, AccessRule, Identity, RouteKind};
use crate::path::FieldPath;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

pub(super) fn from_v1alpha1(
    o: &v1alpha1::TrafficTarget,
) -> Result<model::AccessPolicy, ConvertError> {
    from_legacy(
        &o.metadata,
        &o.spec.destination,
        &o.spec.specs,
        &o.spec.sources,
    )
}

pub(super) fn from_v1alpha2(
    o: &v1alpha2::TrafficTarget,
) -> Result<model::AccessPolicy, ConvertError> {
    from_legacy(
        &o.metadata,
        &o.spec.destination,
        &o.spec.rules,
        &o.spec.sources,
    )
}

pub(super) fn from_v1alpha3(
    o: &v1alpha3::TrafficTarget,
) -> Result<model::AccessPolicy, ConvertError> {
    let mut metadata = o.metadata.clone();
    // Never ignore a malformed port: dropping a port restriction would widen access.
    let destination_port: Option<u16> = annotations::take(&mut metadata, ACCESS_DESTINATION_PORT)?;
    if destination_port == Some(0) {
        return Err(ConvertError::invalid(
            FieldPath::annotation(ACCESS_DESTINATION_PORT),
            "must be a port number 1-65535",
        ));
    }
    Ok(model::AccessPolicy {
        metadata,
        destination: identity(&o.spec.destination),
        destination_port,
        sources: o.spec.sources.iter().map(identity).collect(),
        rules: o
            .spec
            .rules
            .iter()
            .map(|r| rule(r, route_kind(r.kind)))
            .collect(),
    })
}

pub(super) fn to_v1alpha1(m: &model::AccessPolicy) -> v1alpha1::TrafficTarget {
    let (metadata, destination, specs, sources) = to_legacy(m);
    let mut o = v1alpha1::TrafficTarget::new(
        "",
        v1alpha1::TrafficTargetSpec {
            destination,
            specs,
            sources,
        },
    );
    o.metadata = metadata;
    o
}

pub(super) fn to_v1alpha2(m: &model::AccessPolicy) -> v1alpha2::TrafficTarget {
    let (metadata, destination, rules, sources) = to_legacy(m);
    let mut o = v1alpha2::TrafficTarget::new(
        "",
        v1alpha2::TrafficTargetSpec {
            destination,
            rules,
            sources,
        },
    );
    o.metadata = metadata;
    o
}

pub(super) fn to_v1alpha3(m: &model::AccessPolicy) -> v1alpha3::TrafficTarget {
    let mut metadata = m.metadata.clone();
    if let Some(port) = m.destination_port {
        annotations::put(&mut metadata, ACCESS_DESTINATION_PORT, &port);
    }
    let spec = v1alpha3::TrafficTargetSpec {
        destination: subject(&m.destination),
        rules: m
            .rules
            .iter()
            .map(|r| {
                wire_rule(
                    r,
                    match r.kind {
                        RouteKind::HttpRouteGroup => RuleKind::HttpRouteGroup,
                        RouteKind::TcpRoute => RuleKind::TcpRoute,
                        RouteKind::UdpRoute => RuleKind::UdpRoute,
                    },
                )
            })
            .collect(),
        sources: m.sources.iter().map(subject).collect(),
    };
    let mut o = v1alpha3::TrafficTarget::new("", spec);
    o.metadata = metadata;
    o
}

fn from_legacy(
    metadata: &ObjectMeta,
    destination: &PortDestination,
    rules: &[Rule<LegacyRuleKind>],
    sources: &[Subject],
) -> Result<model::AccessPolicy, ConvertError> {
    let mut metadata = metadata.clone();
    let written: Vec<AccessRule> = rules
        .iter()
        .map(|r| rule(r, legacy_route_kind(r.kind)))
        .collect();
    let kept: Option<Vec<Rule<RuleKind>>> = annotations::take(&mut metadata, ACCESS_RULES)?;
    let rules = match kept {
        None => written,
        Some(kept) => {
            let kept: Vec<AccessRule> = kept.iter().map(|r| rule(r, route_kind(r.kind))).collect();
            let expressible: Vec<AccessRule> = kept
                .iter()
                .filter(|r| r.kind != RouteKind::UdpRoute)
                .cloned()
                .collect();
            if expressible == written {
                kept
            } else {
                // The rule list was edited in this version: it wins; the UDPRoute rules it
                // cannot express are added back after it.
                let udp = kept.into_iter().filter(|r| r.kind == RouteKind::UdpRoute);
                written.into_iter().chain(udp).collect()
            }
        }
    };
    Ok(model::AccessPolicy {
        metadata,
        destination: Identity {
            kind: destination.kind.clone(),
            name: destination.name.clone(),
            namespace: destination.namespace.clone(),
        },
        destination_port: destination.port,
        sources: sources.iter().map(identity).collect(),
        rules,
    })
}

type Legacy = (
    ObjectMeta,
    PortDestination,
    Vec<Rule<LegacyRuleKind>>,
    Vec<Subject>,
);

fn to_legacy(m: &model::AccessPolicy) -> Legacy {
    let mut metadata = m.metadata.clone();
    let mut rules = Vec::with_capacity(m.rules.len());
    let mut dropped_udp = false;
    for r in &m.rules {
        match r.kind {
            RouteKind::HttpRouteGroup => rules.push(wire_rule(r, LegacyRuleKind::HttpRouteGroup)),
            RouteKind::TcpRoute => rules.push(wire_rule(r, LegacyRuleKind::TcpRoute)),
            // Leaving a rule out only narrows what the legacy object allows.
            RouteKind::UdpRoute => dropped_udp = true,
        }
    }
    if dropped_udp {
        let all: Vec<Rule<RuleKind>> = to_v1alpha3(&model::AccessPolicy {
            metadata: ObjectMeta::default(),
            destination_port: None,
            ..m.clone()
        })
        .spec
        .rules;
        annotations::put(&mut metadata, ACCESS_RULES, &all);
    }
    let destination = PortDestination {
        kind: m.destination.kind.clone(),
        name: m.destination.name.clone(),
        namespace: m.destination.namespace.clone(),
        port: m.destination_port,
    };
    (
        metadata,
        destination,
        rules,
        m.sources.iter().map(subject).collect(),
    )
}

fn identity(s: &Subject) -> Identity {
    Identity {
        kind: s.kind.clone(),
        name: s.name.clone(),
        namespace: s.namespace.clone(),
    }
}

fn subject(i: &Identity) -> Subject {
    Subject {
        kind: i.kind.clone(),
        name: i.name.clone(),
        namespace: i.namespace.clone(),
    }
}

fn rule<K>(r: &Rule<K>, kind: RouteKind) -> AccessRule {
    AccessRule {
        kind,
        name: r.name.clone(),
        matches: r.matches.clone(),
    }
}

fn wire_rule<K>(r: &AccessRule, kind: K) -> Rule<K> {
    Rule {
        kind,
        name: r.name.clone(),
        matches: r.matches.clone(),
    }
}

fn route_kind(kind: RuleKind) -> RouteKind {
    match kind {
        RuleKind::HttpRouteGroup => RouteKind::HttpRouteGroup,
        RuleKind::TcpRoute => RouteKind::TcpRoute,
        RuleKind::UdpRoute => RouteKind::UdpRoute,
    }
}

fn legacy_route_kind(kind: LegacyRuleKind) -> RouteKind {
    match kind {
        LegacyRuleKind::HttpRouteGroup => RouteKind::HttpRouteGroup,
        LegacyRuleKind::TcpRoute => RouteKind::TcpRoute,
    }
}
