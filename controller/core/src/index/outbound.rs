//! Resolving one destination (a root service) into the proxy-api profile: the TrafficSplit in
//! force joined with the discovered endpoints of the root and its backends.
//!
//! Rules (SPEC-NOTES, and Trellis's decisions where the spec is silent):
//! - No split, or a split whose weights sum to 0: the root service's own endpoints, one backend.
//! - A split: its backends with their weights as exact relative shares (milli-units reduced by
//!   their gcd); weight 0 gets nothing. A backend that does not exist yet has no endpoints
//!   (reported). A backend gets traffic only on the root's port if it has that port number too;
//!   otherwise its weight is 0 (reported). A backend with no ready endpoints gives its share to
//!   the backends that have some (weights renormalised over them; Flagger scales a canary to
//!   zero in the same tick as it zeroes its weight); only when none has any do the weights stay.
//!   Not hierarchical: a backend that is itself a split root is not resolved again.
//! - A split with `matches`: one HTTP route per route group (its matches ORed) sending matching
//!   requests by the split's weights; every other request goes to the root service.
//! - Ports: a destination is the root's first service port (authorities are normalized without
//!   their port for names, so one profile per service).
//! - Only Ready endpoints are sent; identities are SPIFFE ids in the configured trust domain.
//!
//! A TrafficPolicy whose `targetRef` is the root (see [`apply_traffic_policy`]):
//! - its destination sections become `DestinationProfile.policy` (without `rateLimit`, which the
//!   destination's own proxies enforce: `super::inbound`), its `loadBalancer` the profile's
//!   balancer;
//! - a route section covering a whole HTTPRouteGroup the split routes gets that split route's
//!   `policy`; one covering some of a split route's matches becomes a route of its own, with
//!   those matches and the split route's backends, just before it; a section for a group the
//!   split does not route becomes a route of its own (the group's covered matches, no backends =
//!   the default backends) after the split's routes. A section with only a `rateLimit` makes no
//!   route (the limit is inbound);
//! - every mirror's service (`name` in the root's namespace, or `namespace/name`) is a backend of
//!   weight 0, named as the policy writes it, with its endpoints resolved like other backends
//!   (and watched: it is one of [`inputs`]); a mirror service that does not exist means the
//!   policy is not applied (reported).
//!
//! Every problem found here is the split's or the TrafficPolicy's and is located at its origin
//! ([`DestinationPolicy::origin`], [`AppliedPolicy::origin`]); the message starts with the
//! service concerned (`backend shop/web-v2: ...`, `root shop/web: ...`, `mirror shop/x: ...`).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use trellis_discovery::{EndpointSet, ProtocolHint, Readiness, ServiceKey, ServicePort, Snapshot};
use trellis_proxy_api::{policy as contract, v1};
use trellis_smi::model::{HttpMatch, TrafficPolicy};

use super::policy::{AppliedPolicy, DestinationPolicy, policy_id};
use crate::policy::PolicyProblem;

/// What resolving one destination gives.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    /// The answer (a profile or "does not exist"), without a version.
    pub kind: v1::destination_update::Kind,
    /// Problems only discovery could reveal (missing backends, port mismatches).
    pub problems: Vec<PolicyProblem>,
}

/// The services the profile of `root` reads: the root, with a split its backends, with a
/// TrafficPolicy its mirrors' services.
pub fn inputs(root: &ServiceKey, policy: &DestinationPolicy) -> Vec<ServiceKey> {
    let mut out = vec![root.clone()];
    let mut add = |key: ServiceKey| {
        if !out.contains(&key) {
            out.push(key);
        }
    };
    if let Some(split) = &policy.split {
        for b in &split.backends {
            add(ServiceKey::new(&root.namespace, &b.service));
        }
    }
    if let Some(applied) = &policy.traffic {
        for name in mirrors(&applied.policy) {
            add(mirror_service(root, name));
        }
    }
    out
}

/// The mirror backends a TrafficPolicy names (destination first, then its route sections'),
/// each once, as written.
fn mirrors(policy: &TrafficPolicy) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    let named = policy.policy.mirror.iter().chain(
        policy
            .routes
            .iter()
            .filter_map(|r| r.policy.mirror.as_ref()),
    );
    for mirror in named {
        if !out.contains(&mirror.backend.as_str()) {
            out.push(&mirror.backend);
        }
    }
    out
}

/// The service a mirror names: `name` in the root's namespace, or `namespace/name`.
fn mirror_service(root: &ServiceKey, name: &str) -> ServiceKey {
    match name.split_once('/') {
        Some((namespace, name)) => ServiceKey::new(namespace, name),
        None => ServiceKey::new(&root.namespace, name),
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Milli-unit weights as the smallest exact u32 shares (scaled down, rounding, only if they
/// would not fit; SMI weights never come near that).
fn shares(milli: &[u64]) -> Vec<u32> {
    let g = milli.iter().copied().fold(0, gcd).max(1);
    let reduced: Vec<u64> = milli.iter().map(|w| w / g).collect();
    let max = reduced.iter().copied().max().unwrap_or(0);
    let scale = max.div_ceil(u64::from(u32::MAX)).max(1);
    reduced
        .iter()
        .map(|w| u32::try_from(w / scale).unwrap_or(u32::MAX))
        .collect()
}

pub(super) fn protocol(hint: Option<ProtocolHint>) -> v1::Protocol {
    match hint {
        Some(ProtocolHint::Http) => v1::Protocol::Http,
        Some(ProtocolHint::Http2 | ProtocolHint::Grpc) => v1::Protocol::Http2,
        Some(ProtocolHint::Tcp) => v1::Protocol::Tcp,
        None => v1::Protocol::Unspecified,
    }
}

/// The Ready endpoints of `set` on `port` (matched by number in `set`'s ports, then mapped to
/// each endpoint's target port).
fn endpoints(
    set: &EndpointSet,
    port: Option<&ServicePort>,
    trust_domain: &str,
) -> Vec<v1::Endpoint> {
    let own_port = match port {
        Some(p) => set.ports.iter().find(|own| own.port == p.port).cloned(),
        None => set.ports.first().cloned(),
    };
    let mut out: Vec<v1::Endpoint> = set
        .endpoints
        .iter()
        .filter(|e| e.readiness == Readiness::Ready)
        .filter_map(|e| {
            let target = match &own_port {
                Some(p) => e.target_port(p)?,
                None => match e.ports.as_slice() {
                    [only] => only.port,
                    _ => return None,
                },
            };
            Some(v1::Endpoint {
                address: SocketAddr::new(e.address, target).to_string(),
                identity: e.identity.spiffe_id(trust_domain),
                labels: e.labels.clone().into_iter().collect(),
                weight: e.weight.unwrap_or(0),
                protocol: protocol(e.protocol) as i32,
            })
        })
        .collect();
    out.sort_by(|a, b| a.address.cmp(&b.address));
    out
}

fn workload(key: &ServiceKey) -> v1::WorkloadRef {
    v1::WorkloadRef {
        kind: "service".into(),
        name: key.name.clone(),
        namespace: key.namespace.clone(),
    }
}

pub(super) fn http_match(m: &HttpMatch) -> v1::HttpMatch {
    v1::HttpMatch {
        path_regex: m.path_regex.clone().unwrap_or_default(),
        methods: m.methods.clone().unwrap_or_default(),
        headers: m
            .headers
            .iter()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect(),
    }
}

/// Resolves `root`. `None` while the first discovery answer of the root, of a backend or of a
/// mirror has not arrived.
pub fn resolve<'s>(
    root: &ServiceKey,
    policy: &DestinationPolicy,
    snapshot: &dyn Fn(&ServiceKey) -> Option<&'s Snapshot>,
    trust_domain: &str,
) -> Option<Resolved> {
    let mut resolved = resolve_routing(root, policy, snapshot, trust_domain)?;
    if let (v1::destination_update::Kind::Profile(profile), Some(applied)) =
        (&mut resolved.kind, &policy.traffic)
    {
        let port = match snapshot(root) {
            Some(Snapshot::Endpoints(set)) => set.ports.first().cloned(),
            _ => None,
        };
        apply_traffic_policy(
            profile,
            applied,
            root,
            port.as_ref(),
            snapshot,
            trust_domain,
            &mut resolved.problems,
        )?;
    }
    Some(resolved)
}

/// Compiles the TrafficPolicy of `root` into its profile (rules in the module docs). `None`
/// while a mirror's first discovery answer has not arrived.
pub fn apply_traffic_policy<'s>(
    profile: &mut v1::DestinationProfile,
    applied: &AppliedPolicy,
    root: &ServiceKey,
    port: Option<&ServicePort>,
    snapshot: &dyn Fn(&ServiceKey) -> Option<&'s Snapshot>,
    trust_domain: &str,
    problems: &mut Vec<PolicyProblem>,
) -> Option<()> {
    let policy = &applied.policy;
    let location = applied.origin.as_deref().unwrap_or("policy");
    let mut mirror_backends = Vec::new();
    for name in mirrors(policy) {
        let key = mirror_service(root, name);
        match snapshot(&key)? {
            Snapshot::NotFound => {
                // Applied as written or not at all: without its mirror the policy is not the
                // one its author wrote.
                problems.push(PolicyProblem {
                    resource: policy_id(policy),
                    location: location.to_owned(),
                    message: format!(
                        "mirror {key}: no service {key} on any platform: the policy is not applied"
                    ),
                });
                return Some(());
            }
            Snapshot::Endpoints(set) => {
                mirror_backends.push((name, key, endpoints(set, port, trust_domain)));
            }
        }
    }
    for (name, key, eps) in mirror_backends {
        // A mirror that is already a backend (a split's) keeps its place and weight.
        if !profile.backends.iter().any(|b| b.name == name) {
            profile.backends.push(v1::Backend {
                name: name.to_owned(),
                weight: 0,
                endpoints: eps,
                workload: Some(workload(&key)),
            });
        }
    }
    profile.balancer = contract::balancer_to_proto(policy.policy.load_balancer) as i32;
    profile.policy = Some(Box::new(contract::destination_to_proto(&policy.policy)));

    // Route sections: onto the split's routes (named by their group), before them, or after.
    let split_routes = std::mem::take(&mut profile.routes);
    let mut before: Vec<Vec<v1::HttpRoute>> = vec![Vec::new(); split_routes.len()];
    let mut attached: Vec<Option<v1::RoutePolicy>> = vec![None; split_routes.len()];
    let mut after = Vec::new();
    for (section, group) in policy.routes.iter().zip(&applied.groups) {
        let outbound = trellis_policy::RoutePolicy {
            rate_limit: None,
            ..section.policy.clone()
        };
        if outbound == trellis_policy::RoutePolicy::default() {
            continue; // only a rate limit: enforced inbound
        }
        let route_policy = contract::route_to_proto(&outbound);
        let group_name = group.metadata.name.clone().unwrap_or_default();
        let covered: Vec<&HttpMatch> = group
            .matches
            .iter()
            .filter(|m| section.covers(&m.name))
            .collect();
        let whole = covered.len() == group.matches.len();
        let name = if whole {
            group_name.clone()
        } else {
            let names: Vec<&str> = covered.iter().map(|m| m.name.as_str()).collect();
            format!("{group_name}:{}", names.join(","))
        };
        let matches = covered.into_iter().map(http_match).collect();
        match split_routes.iter().position(|r| r.name == group_name) {
            Some(i) if whole => {
                // A later section for the same whole group could never match: the first wins.
                attached[i].get_or_insert(route_policy);
            }
            Some(i) => before[i].push(v1::HttpRoute {
                name,
                matches,
                backends: split_routes[i].backends.clone(),
                policy: Some(route_policy),
            }),
            None => after.push(v1::HttpRoute {
                name,
                matches,
                backends: Vec::new(),
                policy: Some(route_policy),
            }),
        }
    }
    for ((mut route, before), policy) in split_routes.into_iter().zip(before).zip(attached) {
        profile.routes.extend(before);
        route.policy = policy;
        profile.routes.push(route);
    }
    profile.routes.extend(after);
    Some(())
}

/// The split (or the root alone) as a profile, before any TrafficPolicy.
fn resolve_routing<'s>(
    root: &ServiceKey,
    policy: &DestinationPolicy,
    snapshot: &dyn Fn(&ServiceKey) -> Option<&'s Snapshot>,
    trust_domain: &str,
) -> Option<Resolved> {
    let root_set = match snapshot(root)? {
        Snapshot::NotFound => {
            return Some(Resolved {
                kind: v1::destination_update::Kind::NotFound(v1::NotFound {
                    egress_denied: false,
                    external_ports: Vec::new(),
                    reason: format!("no service {root} on any platform"),
                }),
                problems: vec![],
            });
        }
        Snapshot::Endpoints(set) => set,
    };
    let port = root_set.ports.first().cloned();
    let root_backend = v1::Backend {
        name: root.name.clone(),
        weight: 1,
        endpoints: endpoints(root_set, port.as_ref(), trust_domain),
        workload: Some(workload(root)),
    };
    let mut profile = v1::DestinationProfile {
        authority: format!("{}.{}", root.name, root.namespace),
        protocol: protocol(port.as_ref().and_then(|p| p.protocol)) as i32,
        balancer: v1::Balancer::Unspecified as i32,
        workload: Some(workload(root)),
        ..Default::default()
    };
    let mut problems = Vec::new();
    let active = policy
        .split
        .as_ref()
        .filter(|s| s.backends.iter().any(|b| b.weight.milli() > 0));
    let Some(split) = active else {
        profile.backends = vec![root_backend];
        return Some(Resolved {
            kind: v1::destination_update::Kind::Profile(profile),
            problems,
        });
    };
    let split_name = format!(
        "TrafficSplit {}/{}",
        root.namespace,
        split.metadata.name.as_deref().unwrap_or_default()
    );
    // Every problem here is the split's: located where it came from.
    let location = policy.origin.as_deref().unwrap_or("policy");
    // Backends in split order; one backend named twice gets the sum of its weights.
    let mut weights: BTreeMap<&str, u64> = BTreeMap::new();
    let mut order: Vec<&str> = Vec::new();
    for b in &split.backends {
        if !weights.contains_key(b.service.as_str()) {
            order.push(&b.service);
        }
        *weights.entry(&b.service).or_default() += b.weight.milli();
    }
    let mut backends = Vec::new();
    for name in &order {
        let key = ServiceKey::new(&root.namespace, *name);
        let mut weight = weights[name];
        let eps = if key == *root {
            root_backend.endpoints.clone()
        } else {
            match snapshot(&key) {
                // Not answered yet: wait, so the first message is complete (the previous
                // profile keeps serving meanwhile).
                None => return None,
                Some(Snapshot::NotFound) => {
                    problems.push(PolicyProblem {
                        resource: split_name.clone(),
                        location: location.to_owned(),
                        message: format!(
                            "backend {key}: backend service does not exist (yet): its share gets no endpoints"
                        ),
                    });
                    Vec::new()
                }
                Some(Snapshot::Endpoints(set)) => {
                    // A service with no endpoints and no declared ports (Cloud Map takes its
                    // ports from instances, so a backend scaled to zero has none) is empty, not
                    // a port mismatch: its share gets no endpoints either way.
                    let ports_unknown = set.ports.is_empty() && set.endpoints.is_empty();
                    let has_port = match &port {
                        Some(p) => ports_unknown || set.ports.iter().any(|own| own.port == p.port),
                        None => true,
                    };
                    if has_port {
                        endpoints(set, port.as_ref(), trust_domain)
                    } else {
                        problems.push(PolicyProblem {
                            resource: split_name.clone(),
                            location: location.to_owned(),
                            message: format!(
                                "backend {key}: backend lacks the root's port {}: it gets no traffic",
                                port.as_ref().map(|p| p.port).unwrap_or_default()
                            ),
                        });
                        weight = 0;
                        Vec::new()
                    }
                }
            }
        };
        backends.push((key, weight, eps));
    }
    // A weighted backend with no ready endpoints (a canary scaled to zero, a version whose pods
    // all went away) gives its share to the backends that can serve it, so its requests do not
    // fail with 503 no-endpoints; only when none can serve do the weights stay as written.
    // Flagger's rollback zeroes the canary's weight and scales it to zero in the same tick: the
    // endpoints may go first (CONTRACT.md, timing).
    if backends
        .iter()
        .any(|(_, weight, eps)| *weight > 0 && !eps.is_empty())
    {
        for (_, weight, eps) in &mut backends {
            if eps.is_empty() {
                *weight = 0;
            }
        }
    }
    let milli: Vec<u64> = backends.iter().map(|(_, w, _)| *w).collect();
    let shares = shares(&milli);
    if split.matches.is_empty() {
        profile.backends = backends
            .into_iter()
            .zip(shares)
            .map(|((key, _, eps), weight)| v1::Backend {
                name: key.name.clone(),
                weight,
                endpoints: eps,
                workload: Some(workload(&key)),
            })
            .collect();
    } else {
        let refs: Vec<v1::WeightedRef> = backends
            .iter()
            .zip(&shares)
            .map(|((key, _, _), weight)| v1::WeightedRef {
                name: key.name.clone(),
                weight: *weight,
            })
            .collect();
        for (name, group) in &policy.groups {
            if let Some(group) = group {
                profile.routes.push(v1::HttpRoute {
                    name: name.clone(),
                    matches: group.matches.iter().map(http_match).collect(),
                    backends: refs.clone(),
                    policy: None,
                });
            }
        }
        // Requests matching no route go to the root; the split's backends are listed (weight 0
        // by default) so routes can name them.
        profile.backends.push(root_backend);
        for (key, _, eps) in backends {
            if key != *root {
                profile.backends.push(v1::Backend {
                    name: key.name.clone(),
                    weight: 0,
                    endpoints: eps,
                    workload: Some(workload(&key)),
                });
            }
        }
    }
    if profile.backends.iter().all(|b| b.weight == 0) && profile.routes.is_empty() {
        // Every backend lost its share (port mismatches): serve the root rather than nothing.
        problems.push(PolicyProblem {
            resource: split_name,
            location: location.to_owned(),
            message: format!(
                "root {root}: no backend can take traffic: the root service serves it"
            ),
        });
        let root_eps = endpoints(root_set, port.as_ref(), trust_domain);
        profile.backends = vec![v1::Backend {
            name: root.name.clone(),
            weight: 1,
            endpoints: root_eps,
            workload: Some(workload(root)),
        }];
    }
    Some(Resolved {
        kind: v1::destination_update::Kind::Profile(profile),
        problems,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::policy::tests::{split, view};
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::SystemTime;
    use trellis_discovery::{Endpoint, EndpointPort, Provenance, WorkloadIdentity};

    fn set(name: &str, port: u16, eps: &[(&str, u16, Readiness)]) -> Snapshot {
        Snapshot::Endpoints(EndpointSet {
            service: ServiceKey::new("demo", name),
            ports: vec![ServicePort {
                name: Some("http".into()),
                port,
                protocol: Some(ProtocolHint::Http),
            }],
            endpoints: eps
                .iter()
                .map(|(ip, p, readiness)| Endpoint {
                    address: ip.parse().unwrap(),
                    ports: vec![EndpointPort {
                        name: Some("http".into()),
                        port: *p,
                    }],
                    readiness: *readiness,
                    identity: WorkloadIdentity::new("demo", name),
                    owner: None,
                    labels: Default::default(),
                    weight: None,
                    zone: None,
                    protocol: None,
                    provenance: Provenance {
                        source: Arc::from("test"),
                        confirmed_at: SystemTime::UNIX_EPOCH,
                    },
                })
                .collect(),
        })
    }

    fn resolve_with(yaml: &str, snapshots: Vec<(&str, Snapshot)>) -> Resolved {
        let view = view(yaml);
        let root = ServiceKey::new("demo", "web");
        let map: HashMap<ServiceKey, Snapshot> = snapshots
            .into_iter()
            .map(|(n, s)| (ServiceKey::new("demo", n), s))
            .collect();
        resolve(
            &root,
            &view.destination(&root),
            &|k| map.get(k),
            "example.org",
        )
        .unwrap()
    }

    fn profile(r: &Resolved) -> &v1::DestinationProfile {
        match &r.kind {
            v1::destination_update::Kind::Profile(p) => p,
            other => panic!("expected a profile, got {other:?}"),
        }
    }

    fn backends(r: &Resolved) -> Vec<(String, u32, Vec<String>)> {
        profile(r)
            .backends
            .iter()
            .map(|b| {
                (
                    b.name.clone(),
                    b.weight,
                    b.endpoints.iter().map(|e| e.address.clone()).collect(),
                )
            })
            .collect()
    }

    const R: Readiness = Readiness::Ready;

    fn web_both() -> Vec<(&'static str, Snapshot)> {
        vec![
            (
                "web",
                set("web", 8080, &[("10.0.0.1", 81, R), ("10.0.0.2", 82, R)]),
            ),
            ("web-v1", set("web-v1", 8080, &[("10.0.0.1", 81, R)])),
            ("web-v2", set("web-v2", 8080, &[("10.0.0.2", 82, R)])),
        ]
    }

    #[test]
    fn without_a_split_the_root_balances_over_its_own_ready_endpoints_with_spiffe_ids() {
        let mut snaps = web_both();
        snaps[0] = (
            "web",
            set(
                "web",
                8080,
                &[
                    ("10.0.0.1", 81, R),
                    ("10.0.0.2", 82, R),
                    ("10.0.0.3", 83, Readiness::NotReady),
                ],
            ),
        );
        let r = resolve_with("", snaps);
        assert_eq!(
            backends(&r),
            vec![(
                "web".into(),
                1,
                vec!["10.0.0.1:81".into(), "10.0.0.2:82".into()]
            )]
        );
        let p = profile(&r);
        assert_eq!(p.authority, "web.demo");
        assert_eq!(p.protocol, v1::Protocol::Http as i32);
        assert_eq!(
            p.backends[0].endpoints[0].identity,
            "spiffe://example.org/ns/demo/sa/web"
        );
        assert!(r.problems.is_empty());
    }

    #[test]
    fn split_weights_are_exact_relative_shares_and_zero_gets_nothing() {
        let r = resolve_with(
            &split("s", "web", &[("web-v1", 750), ("web-v2", 250)], None),
            web_both(),
        );
        assert_eq!(
            backends(&r),
            vec![
                ("web-v1".into(), 3, vec!["10.0.0.1:81".into()]),
                ("web-v2".into(), 1, vec!["10.0.0.2:82".into()]),
            ]
        );
        let r = resolve_with(
            &split("s", "web", &[("web-v1", 1), ("web-v2", 0)], None),
            web_both(),
        );
        assert_eq!(backends(&r)[1].1, 0);
        assert_eq!(backends(&r)[0].1, 1);
        assert_eq!(shares(&[500, 1000]), vec![1, 2], "500m is half of 1");
    }

    #[test]
    fn weights_summing_to_zero_make_the_split_inactive() {
        let r = resolve_with(
            &split("s", "web", &[("web-v1", 0), ("web-v2", 0)], None),
            web_both(),
        );
        assert_eq!(backends(&r).len(), 1);
        assert_eq!(backends(&r)[0].0, "web");
    }

    #[test]
    fn a_backend_that_does_not_exist_yet_is_tolerated_and_reported() {
        let mut snaps = web_both();
        snaps[2] = ("web-v2", Snapshot::NotFound);
        let r = resolve_with(
            &split("s", "web", &[("web-v1", 1), ("web-v2", 1)], None),
            snaps,
        );
        let b = backends(&r);
        // No endpoints: its share goes to web-v1.
        assert_eq!(b[1], ("web-v2".into(), 0, vec![]));
        // Located at the split (its document starts on line 2 of test.yaml).
        assert_eq!(
            r.problems,
            [PolicyProblem {
                resource: "TrafficSplit demo/s".into(),
                location: "test.yaml:2".into(),
                message: "backend demo/web-v2: backend service does not exist (yet): its share gets no endpoints".into(),
            }]
        );
    }

    #[test]
    fn a_backend_scaled_to_zero_without_declared_ports_is_empty_not_a_port_mismatch() {
        // Cloud Map: a canary scaled to zero is a service with no instances, hence no ports.
        let mut snaps = web_both();
        snaps[2] = (
            "web-v2",
            Snapshot::Endpoints(EndpointSet {
                service: ServiceKey::new("demo", "web-v2"),
                ports: vec![],
                endpoints: vec![],
            }),
        );
        let r = resolve_with(
            &split("s", "web", &[("web-v1", 1), ("web-v2", 1)], None),
            snaps,
        );
        assert_eq!(r.problems, [], "{:?}", r.problems);
        let b = backends(&r);
        // Empty, so its share goes to web-v1.
        assert_eq!(b[1], ("web-v2".into(), 0, vec![]), "{b:?}");

        // The same service with a declared port that is not the root's is still a mismatch.
        let mut snaps = web_both();
        snaps[2] = ("web-v2", set("web-v2", 9090, &[]));
        let r = resolve_with(
            &split("s", "web", &[("web-v1", 1), ("web-v2", 1)], None),
            snaps,
        );
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert!(r.problems[0].message.contains("lacks the root's port 8080"));
    }

    #[test]
    fn a_backend_without_ready_endpoints_gives_its_share_to_those_that_have_some() {
        // Flagger's rollback: canary weight 0 and canary scaled to zero in the same tick; here
        // the endpoints went first, while the split still says 50/50.
        let mut snaps = web_both();
        snaps[2] = (
            "web-v2",
            set("web-v2", 8080, &[("10.0.0.2", 82, Readiness::NotReady)]),
        );
        let r = resolve_with(
            &split("s", "web", &[("web-v1", 500), ("web-v2", 500)], None),
            snaps,
        );
        assert_eq!(r.problems, [], "a canary scaled to zero is no problem");
        assert_eq!(
            backends(&r),
            vec![
                ("web-v1".into(), 1, vec!["10.0.0.1:81".into()]),
                ("web-v2".into(), 0, vec![]),
            ]
        );

        // Nobody can serve: the weights stay as written (requests get 503 no-endpoints).
        let mut snaps = web_both();
        snaps[1] = ("web-v1", set("web-v1", 8080, &[]));
        snaps[2] = ("web-v2", set("web-v2", 8080, &[]));
        let r = resolve_with(
            &split("s", "web", &[("web-v1", 500), ("web-v2", 500)], None),
            snaps,
        );
        let weights: Vec<u32> = backends(&r).iter().map(|b| b.1).collect();
        assert_eq!(weights, [1, 1]);
    }

    #[test]
    fn a_backend_gets_traffic_only_on_root_ports_it_also_has() {
        let mut snaps = web_both();
        snaps[2] = ("web-v2", set("web-v2", 9090, &[("10.0.0.2", 82, R)]));
        let r = resolve_with(
            &split("s", "web", &[("web-v1", 1), ("web-v2", 1)], None),
            snaps,
        );
        let b = backends(&r);
        assert_eq!(b[1].1, 0, "{b:?}");
        let lines =
            |r: &Resolved| -> Vec<String> { r.problems.iter().map(ToString::to_string).collect() };
        assert_eq!(
            lines(&r),
            [
                "test.yaml:2: TrafficSplit demo/s: backend demo/web-v2: backend lacks the root's port 8080: it gets no traffic"
            ]
        );

        // No backend left: the root serves, reported at the split too.
        let mut snaps = web_both();
        snaps[2] = ("web-v2", set("web-v2", 9090, &[("10.0.0.2", 82, R)]));
        let r = resolve_with(&split("s", "web", &[("web-v2", 1)], None), snaps);
        assert_eq!(backends(&r)[0].0, "web");
        assert_eq!(
            lines(&r),
            [
                "test.yaml:2: TrafficSplit demo/s: backend demo/web-v2: backend lacks the root's port 8080: it gets no traffic",
                "test.yaml:2: TrafficSplit demo/s: root demo/web: no backend can take traffic: the root service serves it",
            ]
        );
    }

    #[test]
    fn splits_are_not_hierarchical() {
        let yaml = [
            split("s", "web", &[("web-v1", 1)], None),
            split("inner", "web-v1", &[("web-v2", 1)], None),
        ]
        .concat();
        let r = resolve_with(&yaml, web_both());
        assert_eq!(
            backends(&r),
            vec![("web-v1".into(), 1, vec!["10.0.0.1:81".into()])]
        );
    }

    #[test]
    fn matches_become_routes_with_the_split_and_other_requests_go_to_the_root() {
        let mut yaml = split("s", "web", &[("web-v1", 0), ("web-v2", 1)], None);
        yaml.push_str("  matches:\n  - {kind: HTTPRouteGroup, name: beta}\n");
        yaml.push_str("---\napiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\nmetadata: {name: beta, namespace: demo}\nspec:\n  matches:\n  - name: beta-users\n    headers:\n    - x-beta: \"yes\"\n");
        let r = resolve_with(&yaml, web_both());
        let p = profile(&r);
        assert_eq!(p.routes.len(), 1);
        assert_eq!(p.routes[0].name, "beta");
        assert_eq!(
            p.routes[0].matches[0]
                .headers
                .get("x-beta")
                .map(String::as_str),
            Some("yes")
        );
        let refs: Vec<(String, u32)> = p.routes[0]
            .backends
            .iter()
            .map(|b| (b.name.clone(), b.weight))
            .collect();
        assert_eq!(refs, vec![("web-v1".into(), 0), ("web-v2".into(), 1)]);
        let b = backends(&r);
        assert_eq!(
            b[0],
            (
                "web".into(),
                1,
                vec!["10.0.0.1:81".into(), "10.0.0.2:82".into()]
            )
        );
        assert!(b[1..].iter().all(|(_, w, _)| *w == 0), "{b:?}");
    }

    /// A split of web routed by `web-routes` (api, static), a second group `admin-routes`, and
    /// a TrafficPolicy for web (from line `POLICY_LINE` of test.yaml).
    fn policy_yaml(policy_spec: &str) -> String {
        let mut yaml = split("s", "web", &[("web-v1", 1), ("web-v2", 3)], None);
        yaml.push_str("  matches:\n  - {kind: HTTPRouteGroup, name: web-routes}\n");
        yaml.push_str("---\napiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\nmetadata: {name: web-routes, namespace: demo}\nspec:\n  matches:\n  - {name: api, pathRegex: '/api/.*'}\n  - {name: static, pathRegex: '/static/.*'}\n");
        yaml.push_str("---\napiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\nmetadata: {name: admin-routes, namespace: demo}\nspec:\n  matches:\n  - {name: admin, pathRegex: '/admin'}\n");
        yaml.push_str("---\napiVersion: policy.trellis.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: web-policy, namespace: demo}\nspec:\n  targetRef: {name: web}\n");
        yaml.push_str(policy_spec);
        yaml
    }

    /// Line of the TrafficPolicy's document in [`policy_yaml`].
    const POLICY_LINE: u32 = 28;

    const FULL_POLICY: &str = "  timeouts: {request: 2s}
  circuitBreaker: {maxConnections: 10}
  rateLimit: {requestsPerSecond: 100}
  loadBalancer: leastRequest
  mirror: {backend: web-shadow, percent: 5}
  routes:
  - httpRouteGroup: web-routes
    timeouts: {request: 9s}
  - httpRouteGroup: web-routes
    matches: [api]
    retries: {attempts: 2}
  - httpRouteGroup: admin-routes
    fault: {abort: {httpStatus: 503, percent: 100}}
  - httpRouteGroup: web-routes
    rateLimit: {requestsPerSecond: 5}
";

    fn with_shadow() -> Vec<(&'static str, Snapshot)> {
        let mut snaps = web_both();
        snaps.push((
            "web-shadow",
            set("web-shadow", 8080, &[("10.0.0.9", 89, R)]),
        ));
        snaps
    }

    fn route_summary(p: &v1::DestinationProfile) -> Vec<(String, usize, Vec<String>, bool)> {
        p.routes
            .iter()
            .map(|r| {
                (
                    r.name.clone(),
                    r.matches.len(),
                    r.backends
                        .iter()
                        .map(|b| format!("{} {}", b.name, b.weight))
                        .collect(),
                    r.policy.is_some(),
                )
            })
            .collect()
    }

    #[test]
    fn a_traffic_policy_lands_in_the_profile() {
        let yaml = policy_yaml(FULL_POLICY);
        let r = resolve_with(&yaml, with_shadow());
        assert_eq!(r.problems, [], "{:?}", r.problems);
        let p = profile(&r);
        assert_eq!(p.balancer, v1::Balancer::LeastRequest as i32);
        // The destination sections, typed; the rate limit is not the caller's to enforce.
        let sent = p.policy.as_ref().expect("the profile carries the policy");
        let back = contract::destination_from_proto(*sent.clone()).unwrap();
        assert_eq!(back.timeouts.unwrap().request.unwrap().as_millis(), 2000);
        assert_eq!(back.circuit_breaker.unwrap().max_connections, Some(10));
        assert_eq!(back.mirror.unwrap().backend, "web-shadow");
        assert!(back.rate_limit.is_none());
        // The mirror is a backend of weight 0 with its endpoints.
        assert_eq!(
            backends(&r).last().unwrap(),
            &("web-shadow".to_string(), 0, vec!["10.0.0.9:89".to_string()])
        );
        // Routes: the section for api alone before the split's route (with its backends), the
        // whole-group section on the split's route, the other group's after, with no backends
        // (the default ones); the rate-limit-only section makes no route.
        assert_eq!(
            route_summary(p),
            [
                (
                    "web-routes:api".into(),
                    1,
                    vec!["web-v1 1".into(), "web-v2 3".into()],
                    true
                ),
                (
                    "web-routes".into(),
                    2,
                    vec!["web-v1 1".into(), "web-v2 3".into()],
                    true
                ),
                ("admin-routes".into(), 1, vec![], true),
            ]
        );
        let route =
            |i: usize| contract::route_from_proto(p.routes[i].policy.clone().unwrap()).unwrap();
        assert_eq!(route(0).retries.unwrap().attempts, 2);
        assert_eq!(
            route(1).timeouts.unwrap().request.unwrap().as_millis(),
            9000
        );
        assert_eq!(
            route(2).fault.unwrap().abort.unwrap().http_status,
            Some(503)
        );
        assert_eq!(p.routes[0].matches[0].path_regex, "/api/.*");
    }

    #[test]
    fn without_a_split_route_sections_are_routes_of_their_own_over_the_default_backends() {
        let yaml = policy_yaml(FULL_POLICY).replace(
            "  matches:\n  - {kind: HTTPRouteGroup, name: web-routes}\n",
            "",
        );
        let r = resolve_with(&yaml, with_shadow());
        let p = profile(&r);
        assert_eq!(
            route_summary(p),
            [
                ("web-routes".into(), 2, vec![], true),
                ("web-routes:api".into(), 1, vec![], true),
                ("admin-routes".into(), 1, vec![], true),
            ]
        );
        // The split's weights stay the default backends; the mirror gets nothing of them.
        let weights: Vec<(String, u32)> = backends(&r).into_iter().map(|b| (b.0, b.1)).collect();
        assert_eq!(
            weights,
            [
                ("web-v1".into(), 1),
                ("web-v2".into(), 3),
                ("web-shadow".into(), 0)
            ]
        );
    }

    #[test]
    fn a_mirror_is_watched_and_waited_for_and_a_missing_one_means_the_policy_is_not_applied() {
        let yaml = policy_yaml(FULL_POLICY);
        let view = view(&yaml);
        let root = ServiceKey::new("demo", "web");
        let destination = view.destination(&root);
        assert!(inputs(&root, &destination).contains(&ServiceKey::new("demo", "web-shadow")));
        // Not answered yet: no profile (the first message is complete).
        let map: HashMap<ServiceKey, Snapshot> = web_both()
            .into_iter()
            .map(|(n, s)| (ServiceKey::new("demo", n), s))
            .collect();
        assert!(resolve(&root, &destination, &|k| map.get(k), "x").is_none());

        let mut snaps = web_both();
        snaps.push(("web-shadow", Snapshot::NotFound));
        let r = resolve_with(&yaml, snaps);
        let p = profile(&r);
        assert!(p.policy.is_none(), "not applied");
        assert_eq!(p.balancer, v1::Balancer::Unspecified as i32);
        assert!(p.routes.iter().all(|r| r.policy.is_none()));
        assert_eq!(p.routes.len(), 1, "the split's route only");
        assert_eq!(
            r.problems,
            [PolicyProblem {
                resource: "TrafficPolicy demo/web-policy".into(),
                location: format!("test.yaml:{POLICY_LINE}"),
                message: "mirror demo/web-shadow: no service demo/web-shadow on any platform: the policy is not applied".into(),
            }]
        );
    }

    #[test]
    fn a_root_that_does_not_exist_is_answered_not_found_and_waits_for_its_first_answer() {
        let r = resolve_with("", vec![("web", Snapshot::NotFound)]);
        assert!(matches!(r.kind, v1::destination_update::Kind::NotFound(_)));
        let root = ServiceKey::new("demo", "web");
        assert!(resolve(&root, &DestinationPolicy::default(), &|_| None, "x").is_none());
    }
}
