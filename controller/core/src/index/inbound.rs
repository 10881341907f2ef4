//! Resolving the inbound policy of one workload port from TrafficTargets.
//!
//! - The workload `namespace/name` a proxy names is the ServiceAccount it runs as (on platforms
//!   without ServiceAccounts, the service name: the adapters' identity convention).
//! - A TrafficTarget applies when its destination ServiceAccount (namespace defaulting to the
//!   target's) is the workload, and its port (v1alpha1/2 `destination.port`, else its TCPRoutes'
//!   ports, empty = every port) includes the port asked for.
//! - One target becomes one [`v1::Authorization`]: its sources as SPIFFE ids, the ports of its
//!   TCPRoutes (AND with the destination port), the matches of its HTTPRouteGroup rules (only the
//!   named ones when `matches` is given). Several targets are ORed.
//! - A rule naming a route that does not exist is dropped (reported, at the target's origin):
//!   access is never widened. A target left with no rule allows nothing.
//! - Default deny. Callers are identified by their mTLS certificate; callers without one
//!   (plaintext) are refused unless the operator said otherwise, knowingly, with one of the
//!   access switches ([`AccessSwitches`], all reported in `/api/v1/state` and `trellis check`):
//!   - `--permissive` (mesh-wide) / `--permissive-namespace NS`: the default action is allow
//!     (for workloads in NS), which admits everything no rule allows, plaintext included;
//!   - `--plaintext-from CIDR` (repeatable): one extra authorization for every workload,
//!     `unauthenticated: true` with `networks` = every CIDR given;
//!   - `--plaintext-namespace NS` (repeatable): for workloads in NS, one extra authorization
//!     `unauthenticated: true` with no network restriction.
//!
//!   The switches only ever add: TrafficTarget authorizations are unchanged by them.
//!
//! Rate limits ([`rate_limits`]): a TrafficPolicy's `rateLimit`s protect each instance of its
//! target Service, so they go into the inbound policy of the workloads behind it: the workload
//! whose identity (namespace and ServiceAccount) an endpoint of the target carries, on the port
//! that endpoint serves the Service on. Only discovery knows those endpoints: the index watches
//! every TrafficPolicy's target. Route limits come first, with the matches of their route
//! section, then the Service's own limit, with no matches (the proxy takes the first limit whose
//! matches a request matches). A policy that is not applied (see `super::policy`) limits nothing.
//!
//! End-user authentication ([`end_user`]): a TrafficPolicy's `jwt`, service `claims` and route
//! sections' `claims` reach the same workloads, on the same ports, as its rate limits:
//! `InboundPolicy.jwt`, and one `claim_requirements` entry per route section with claims (its
//! matches) and one for the service's claims (no matches: every request). Requirements are not
//! authorizations: TrafficTarget rules are ORed, so a claim condition inside one rule would be
//! waived by any other rule allowing the request (another target, a TCPRoute rule, an
//! overlapping path); the proxy ANDs every requirement a request matches with whatever the
//! rules decide, and refuses opaque TCP on such a port. Everything here fails closed
//! ([`EndUser::refuse`]: the port allows nothing, reported):
//! - the TrafficPolicy in force for a target is not applied (a route section names a missing
//!   group or match) and carries `jwt` or `claims`: leaving it out would open its routes;
//! - two services behind one workload port have different `jwt`s: one port has one JWT policy,
//!   and merging the providers would let one service's tokens into the other (the problem
//!   names both policies). Services behind the port without a `jwt` get the one there is;
//! - discovery has not answered yet for a target with `jwt` or `claims` in the workload's
//!   namespace: the workload may be behind it (not reported: it lasts until the first answer).

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;
use trellis_discovery::{ServiceKey, Snapshot, WorkloadIdentity};
use trellis_proxy_api::v1;
use trellis_smi::model::{AccessPolicy, RouteKind, effective_namespace};

use super::IndexOptions;
use super::outbound::http_match;
use super::policy::{PolicyView, policy_id, policy_rid, target_rid};
use crate::policy::PolicyProblem;

/// The explicit switches that let more in than TrafficTargets do (besides mesh-wide
/// `--permissive`, which is [`IndexOptions::permissive`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AccessSwitches {
    /// `--permissive-namespace`: default allow for workloads in these namespaces.
    pub permissive_namespaces: Vec<String>,
    /// `--plaintext-from`: plaintext callers from these networks may call every workload.
    #[serde(serialize_with = "as_strings")]
    pub plaintext_from: Vec<IpNet>,
    /// `--plaintext-namespace`: plaintext callers from anywhere may call workloads here.
    pub plaintext_namespaces: Vec<String>,
}

fn as_strings<S: serde::Serializer>(nets: &[IpNet], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(nets.iter().map(ToString::to_string))
}

/// Parses a `--plaintext-from` value: a CIDR (`10.0.0.0/8`) or a single address (`/32`,
/// `/128`). Host bits set (`10.0.0.1/8`) are refused: the operator likely meant something else.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    let net: IpNet = text.parse().map_err(|_| {
        format!("{text:?} is not a CIDR (e.g. 10.0.0.0/8, 127.0.0.1/32, fd00::/8) or an address")
    })?;
    if net.trunc() != net {
        return Err(format!(
            "{text:?} has host bits set: did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

/// The inbound policy of `namespace/name` on `port` (version left empty) and its problems.
pub fn resolve(
    view: &PolicyView,
    namespace: &str,
    name: &str,
    port: u16,
    options: &IndexOptions,
) -> (v1::InboundPolicy, Vec<PolicyProblem>) {
    let mut problems = Vec::new();
    let mut authorizations = Vec::new();
    for target in &view.access {
        let ns = effective_namespace(&target.metadata);
        let dest_ns = target.destination.namespace.as_deref().unwrap_or(ns);
        if dest_ns != namespace || target.destination.name != name {
            continue;
        }
        if let Some(authz) = authorization(view, target, port, &options.trust_domain, &mut problems)
        {
            authorizations.push(authz);
        }
        if let Some(authz) =
            udp_authorization(view, target, port, &options.trust_domain, &mut problems)
        {
            authorizations.push(authz);
        }
    }
    let access = &options.access;
    let plaintext = |networks: Vec<String>| v1::Authorization {
        identities: Vec::new(),
        ports: Vec::new(),
        routes: Vec::new(),
        unauthenticated: true,
        networks,
        protocols: Vec::new(),
        claims: Vec::new(),
    };
    if !access.plaintext_from.is_empty() {
        authorizations.push(plaintext(
            access
                .plaintext_from
                .iter()
                .map(ToString::to_string)
                .collect(),
        ));
    }
    if access.plaintext_namespaces.iter().any(|ns| ns == namespace) {
        authorizations.push(plaintext(Vec::new()));
    }
    let permissive = options.permissive
        || access
            .permissive_namespaces
            .iter()
            .any(|ns| ns == namespace);
    let policy = v1::InboundPolicy {
        version: String::new(),
        protocol: v1::Protocol::Unspecified as i32,
        authorizations,
        default_action: if permissive {
            v1::DefaultAction::Allow
        } else {
            v1::DefaultAction::Deny
        } as i32,
        access_log: options
            .access_log_namespaces
            .iter()
            .any(|ns| ns == namespace),
        // Filled by the index, which holds the discovery snapshots they need ([`rate_limits`]).
        rate_limits: Vec::new(),
        // Filled by the index with the claim requirements ([`end_user`]), which need discovery.
        jwt: None,
        claim_requirements: Vec::new(),
    };
    (policy, problems)
}

/// The local rate limits of workload `namespace/name` on `port`: those of the applied
/// TrafficPolicies whose target has an endpoint of this workload serving on this port (target
/// services not answered yet by discovery give none, until they are).
pub fn rate_limits<'s>(
    view: &PolicyView,
    namespace: &str,
    name: &str,
    port: u16,
    snapshot: &dyn Fn(&ServiceKey) -> Option<&'s Snapshot>,
) -> Vec<v1::InboundRateLimit> {
    let mut targets: Vec<&ServiceKey> = view
        .traffic_targets()
        .filter(|t| t.namespace == namespace)
        .collect();
    targets.sort();
    let (mut routes, mut services) = (Vec::new(), Vec::new());
    for target in targets {
        let Some(policy) = view.traffic_policy(target) else {
            continue;
        };
        let limited = policy.policy.rate_limit.is_some()
            || policy.routes.iter().any(|r| r.policy.rate_limit.is_some());
        if !limited {
            continue;
        }
        let Some(Snapshot::Endpoints(set)) = snapshot(target) else {
            continue;
        };
        let serves = set.endpoints.iter().any(|e| {
            e.identity.namespace == namespace
                && e.identity.service_account == name
                && set.ports.iter().any(|p| e.target_port(p) == Some(port))
        });
        if !serves {
            continue;
        }
        for route in &policy.routes {
            let Some(limit) = &route.policy.rate_limit else {
                continue;
            };
            let Some(group) = view
                .route_groups
                .get(&(namespace.to_owned(), route.http_route_group.clone()))
            else {
                continue; // not reached: a policy naming a missing group is not applied
            };
            let matches = group
                .matches
                .iter()
                .filter(|m| route.covers(&m.name))
                .map(http_match)
                .collect();
            routes.push(trellis_proxy_api::policy::rate_limit_to_proto(
                format!("{target}/{}", route.http_route_group),
                matches,
                limit,
            ));
        }
        if let Some(limit) = &policy.policy.rate_limit {
            services.push(trellis_proxy_api::policy::rate_limit_to_proto(
                target.to_string(),
                Vec::new(),
                limit,
            ));
        }
    }
    routes.extend(services);
    routes
}

/// The end-user authentication of workload `namespace/name` on `port`, from the TrafficPolicies
/// of the services it serves there (see the module docs).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EndUser {
    /// `InboundPolicy.jwt`.
    pub jwt: Option<v1::JwtPolicy>,
    /// `InboundPolicy.claim_requirements`: route sections' first, in policy order, then the
    /// services' own (the order only chooses which unmet one a refusal names).
    pub claim_requirements: Vec<v1::ClaimRequirement>,
    /// The port must allow nothing: what it would need cannot be applied safely.
    pub refuse: bool,
    /// Why it refuses, when it is to be fixed by the operator.
    pub problems: Vec<PolicyProblem>,
}

/// [`EndUser`] of workload `namespace/name` on `port`; `snapshot` is discovery's last answer
/// for a service (`None`: not answered yet).
pub fn end_user<'s>(
    view: &PolicyView,
    namespace: &str,
    name: &str,
    port: u16,
    snapshot: &dyn Fn(&ServiceKey) -> Option<&'s Snapshot>,
) -> EndUser {
    let mut targets: Vec<&ServiceKey> = view
        .traffic_targets()
        .filter(|t| t.namespace == namespace)
        .collect();
    targets.sort();
    let mut out = EndUser::default();
    let workload = format!("{namespace}/{name}");
    // The policy whose `jwt` is in force, for naming it in a conflict.
    let mut jwt_from: Option<&trellis_smi::model::TrafficPolicy> = None;
    let (mut routes, mut services) = (Vec::new(), Vec::new());
    for target in targets {
        // The one in force, applied or not: a policy that cannot be applied must still close.
        let Some(policy) = view.traffic.get(target).and_then(|p| p.first()) else {
            continue;
        };
        let claims =
            !policy.claims.is_empty() || policy.routes.iter().any(|r| !r.claims.is_empty());
        if policy.jwt.is_none() && !claims {
            continue;
        }
        let set = match snapshot(target) {
            None => {
                // Not answered yet: this workload may be behind the target.
                out.refuse = true;
                continue;
            }
            Some(Snapshot::NotFound) => continue,
            Some(Snapshot::Endpoints(set)) => set,
        };
        let serves = set.endpoints.iter().any(|e| {
            e.identity.namespace == namespace
                && e.identity.service_account == name
                && set.ports.iter().any(|p| e.target_port(p) == Some(port))
        });
        if !serves {
            continue;
        }
        let location = view.location(&policy_rid(policy));
        if view.traffic_broken.contains(target) {
            out.refuse = true;
            out.problems.push(PolicyProblem {
                resource: policy_id(policy),
                location,
                message: format!(
                    "service {target}: the policy is not applied and carries jwt or claims: workload {workload} refuses every request on port {port} until it is fixed"
                ),
            });
            continue;
        }
        if let Some(jwt) = &policy.jwt {
            match jwt_from {
                None => jwt_from = Some(policy),
                Some(first) if first.jwt.as_ref() == Some(jwt) => {}
                Some(first) => {
                    out.refuse = true;
                    out.problems.push(PolicyProblem {
                        resource: policy_id(policy),
                        location,
                        message: format!(
                            "service {target}: its jwt differs from the one of {} (at {}), and workload {workload} serves both on port {port}, which has one JWT policy: it refuses every request until they are the same",
                            policy_id(first),
                            view.location(&policy_rid(first)),
                        ),
                    });
                    continue;
                }
            }
        }
        for route in &policy.routes {
            if route.claims.is_empty() {
                continue;
            }
            let Some(group) = view
                .route_groups
                .get(&(namespace.to_owned(), route.http_route_group.clone()))
            else {
                continue; // not reached: a policy naming a missing group is broken (above)
            };
            let matches: Vec<v1::HttpMatch> = group
                .matches
                .iter()
                .filter(|m| route.covers(&m.name))
                .map(http_match)
                .collect();
            if matches.is_empty() {
                continue; // the section covers no request (its group has no match)
            }
            routes.push(trellis_proxy_api::jwt::claim_requirement_to_proto(
                format!("{target}/{}", route.http_route_group),
                matches,
                &route.claims,
            ));
        }
        if !policy.claims.is_empty() {
            services.push(trellis_proxy_api::jwt::claim_requirement_to_proto(
                target.to_string(),
                Vec::new(),
                &policy.claims,
            ));
        }
    }
    routes.extend(services);
    out.jwt = jwt_from
        .and_then(|p| p.jwt.as_ref())
        .map(trellis_proxy_api::jwt::policy_to_proto);
    out.claim_requirements = routes;
    if out.jwt.is_none() && !out.claim_requirements.is_empty() {
        // Validation refuses claims without jwt; a source that skipped it must not open.
        out.refuse = true;
    }
    if out.refuse {
        out.jwt = None;
        out.claim_requirements.clear();
    }
    out
}

fn authorization(
    view: &PolicyView,
    target: &AccessPolicy,
    port: u16,
    trust_domain: &str,
    problems: &mut Vec<PolicyProblem>,
) -> Option<v1::Authorization> {
    let ns = effective_namespace(&target.metadata);
    let id = format!(
        "TrafficTarget {ns}/{}",
        target.metadata.name.as_deref().unwrap_or_default()
    );
    let mut routes = Vec::new();
    let mut has_http_rule = false;
    let mut port_list: Vec<u16> = Vec::new();
    let mut every_port = false;
    let mut has_port_rule = false;
    let missing = |kind: &str, name: &str, problems: &mut Vec<PolicyProblem>| {
        problems.push(PolicyProblem {
            resource: id.clone(),
            // Looked up only for a problem: the resolution itself needs no origin.
            location: view.location(&target_rid(target)),
            message: format!(
                "{kind} {ns}/{name} is referenced but missing: that rule allows nothing"
            ),
        });
    };
    for rule in &target.rules {
        match rule.kind {
            RouteKind::HttpRouteGroup => {
                let Some(group) = view.route_groups.get(&(ns.to_owned(), rule.name.clone())) else {
                    missing("HTTPRouteGroup", &rule.name, problems);
                    continue;
                };
                has_http_rule = true;
                for m in &group.matches {
                    if rule
                        .matches
                        .as_ref()
                        .is_none_or(|names| names.contains(&m.name))
                    {
                        routes.push(v1::HttpMatch {
                            path_regex: m.path_regex.clone().unwrap_or_default(),
                            methods: m.methods.clone().unwrap_or_default(),
                            headers: m
                                .headers
                                .iter()
                                .map(|h| (h.name.clone(), h.value.clone()))
                                .collect(),
                        });
                    }
                }
            }
            RouteKind::TcpRoute => {
                let Some(route) = view.tcp_routes.get(&(ns.to_owned(), rule.name.clone())) else {
                    missing("TCPRoute", &rule.name, problems);
                    continue;
                };
                has_port_rule = true;
                if route.ports.is_empty() {
                    every_port = true;
                }
                port_list.extend(&route.ports);
            }
            RouteKind::UdpRoute => {} // a rule of its own: `udp_authorization`
        }
    }
    if !has_http_rule && !has_port_rule {
        return None; // no usable rule: allows nothing
    }
    if has_http_rule && routes.is_empty() {
        return None; // only unknown match names: allows nothing
    }
    // Empty = every port (no TCPRoute, or one with `ports: []`).
    let ports = rule_ports(every_port, port_list, target.destination_port, port)?;
    Some(v1::Authorization {
        identities: source_identities(target, trust_domain)?,
        ports,
        routes,
        unauthenticated: false,
        networks: Vec::new(),
        claims: Vec::new(),
        protocols: Vec::new(),
    })
}

/// The UDP rule of `target` for the inbound policy of `port`: its UDPRoutes' ports (empty = every
/// port) AND its destination port, for its sources, covering UDP only (the proxy carries UDP in
/// mTLS tunnels, authorized by the application's UDP port). None when it has no UDPRoute rule, or
/// none covers `port`. HTTP and TCP rules of the same target are [`authorization`]'s: SMI ANDs
/// the L4 and L7 rules of one target, and a UDP datagram has no HTTP request to match.
fn udp_authorization(
    view: &PolicyView,
    target: &AccessPolicy,
    port: u16,
    trust_domain: &str,
    problems: &mut Vec<PolicyProblem>,
) -> Option<v1::Authorization> {
    let ns = effective_namespace(&target.metadata);
    let mut port_list = Vec::new();
    let mut every_port = false;
    let mut any = false;
    for rule in target
        .rules
        .iter()
        .filter(|r| r.kind == RouteKind::UdpRoute)
    {
        let Some(route) = view.udp_routes.get(&(ns.to_owned(), rule.name.clone())) else {
            problems.push(PolicyProblem {
                resource: format!(
                    "TrafficTarget {ns}/{}",
                    target.metadata.name.as_deref().unwrap_or_default()
                ),
                location: view.location(&target_rid(target)),
                message: format!(
                    "UDPRoute {ns}/{} is referenced but missing: that rule allows nothing",
                    rule.name
                ),
            });
            continue;
        };
        any = true;
        every_port |= route.ports.is_empty();
        port_list.extend(&route.ports);
    }
    if !any {
        return None;
    }
    let ports = rule_ports(every_port, port_list, target.destination_port, port)?;
    Some(v1::Authorization {
        identities: source_identities(target, trust_domain)?,
        ports,
        routes: Vec::new(),
        unauthenticated: false,
        networks: Vec::new(),
        claims: Vec::new(),
        protocols: vec![v1::L4Protocol::Udp as i32],
    })
}

/// The ports a rule covers (empty = every port): its routes' ports (`every` when one of them has
/// `ports: []`) AND the target's destination port; None when they are disjoint or leave out
/// `port`, the port whose inbound policy is being made.
fn rule_ports(
    every: bool,
    route_ports: Vec<u16>,
    destination_port: Option<u16>,
    port: u16,
) -> Option<Vec<u32>> {
    let mut ports = if every { Vec::new() } else { route_ports };
    if let Some(p) = destination_port {
        if !ports.is_empty() && !ports.contains(&p) {
            return None; // route ports AND destination port: disjoint
        }
        ports = vec![p];
    }
    ports.sort_unstable();
    ports.dedup();
    if !ports.is_empty() && !ports.contains(&port) {
        return None;
    }
    Some(ports.into_iter().map(u32::from).collect())
}

/// The SPIFFE ids of `target`'s sources; None when it has none (allows nobody: said explicitly
/// rather than left to the proxy).
fn source_identities(target: &AccessPolicy, trust_domain: &str) -> Option<Vec<String>> {
    if target.sources.is_empty() {
        return None;
    }
    let ns = effective_namespace(&target.metadata);
    Some(
        target
            .sources
            .iter()
            .map(|s| {
                let source_ns = s.namespace.as_deref().unwrap_or(ns);
                WorkloadIdentity::new(source_ns, &s.name).spiffe_id(trust_domain)
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::policy::tests::view;

    const ROUTES: &str = "---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: api, namespace: demo}
spec:
  matches:
  - {name: metrics, pathRegex: /metrics, methods: [GET]}
  - {name: everything, pathRegex: '.*'}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: web-port, namespace: demo}
spec:
  matches:
    ports: [8080]
";

    fn target(rules: &str) -> String {
        format!(
            "---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {{name: t, namespace: demo}}
spec:
  destination: {{kind: ServiceAccount, name: web, namespace: demo}}
  sources:
  - {{kind: ServiceAccount, name: client, namespace: demo}}
  rules:
{rules}"
        )
    }

    fn options(permissive: bool) -> IndexOptions {
        IndexOptions {
            permissive,
            ..IndexOptions::default()
        }
    }

    fn resolve_for(
        yaml: &str,
        port: u16,
        permissive: bool,
    ) -> (v1::InboundPolicy, Vec<PolicyProblem>) {
        resolve(&view(yaml), "demo", "web", port, &options(permissive))
    }

    #[test]
    fn default_deny_and_the_explicit_permissive_switch() {
        let (p, _) = resolve_for("", 8080, false);
        assert!(p.authorizations.is_empty());
        assert_eq!(p.default_action, v1::DefaultAction::Deny as i32);
        let (p, _) = resolve_for("", 8080, true);
        assert_eq!(p.default_action, v1::DefaultAction::Allow as i32);
    }

    #[test]
    fn http_route_group_rules_allow_the_named_matches_for_the_sources() {
        let yaml = format!(
            "{ROUTES}{}",
            target("  - {kind: HTTPRouteGroup, name: api, matches: [metrics]}\n")
        );
        let (p, problems) = resolve_for(&yaml, 9999, false);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(p.authorizations.len(), 1);
        let a = &p.authorizations[0];
        assert_eq!(
            a.identities,
            vec!["spiffe://cluster.local/ns/demo/sa/client"]
        );
        assert!(
            a.ports.is_empty(),
            "an HTTPRouteGroup alone allows any port"
        );
        assert_eq!(a.routes.len(), 1);
        assert_eq!(a.routes[0].path_regex, "/metrics");
        assert_eq!(a.routes[0].methods, vec!["GET"]);
        assert!(!a.unauthenticated);
    }

    #[test]
    fn tcp_route_ports_and_http_rules_combine_as_and() {
        let yaml = format!(
            "{ROUTES}{}",
            target(
                "  - {kind: HTTPRouteGroup, name: api, matches: [metrics]}\n  - {kind: TCPRoute, name: web-port}\n"
            )
        );
        let (p, _) = resolve_for(&yaml, 8080, false);
        assert_eq!(p.authorizations[0].ports, vec![8080]);
        assert_eq!(p.authorizations[0].routes.len(), 1);
        let (p, _) = resolve_for(&yaml, 9090, false);
        assert!(p.authorizations.is_empty(), "another port is not covered");
    }

    #[test]
    fn udp_route_rules_are_rules_of_their_own_covering_udp_only() {
        let udp = "---\napiVersion: specs.smi-spec.io/v1alpha4\nkind: UDPRoute\nmetadata: {name: dns, namespace: demo}\nspec:\n  matches:\n    ports: [5353]\n";
        // A UDPRoute alone: one rule, UDP only, on the route's ports.
        let yaml = format!(
            "{ROUTES}{udp}{}",
            target("  - {kind: UDPRoute, name: dns}\n")
        );
        let (p, problems) = resolve_for(&yaml, 5353, false);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(p.authorizations.len(), 1);
        let a = &p.authorizations[0];
        assert_eq!(a.protocols, vec![v1::L4Protocol::Udp as i32]);
        assert_eq!(a.ports, vec![5353]);
        assert!(a.routes.is_empty());
        assert_eq!(
            a.identities,
            vec!["spiffe://cluster.local/ns/demo/sa/client"]
        );
        let (p, _) = resolve_for(&yaml, 8080, false);
        assert!(p.authorizations.is_empty(), "another port is not covered");

        // With an HTTP rule in the same target: the HTTP rule stays TCP only (an empty list), and
        // the UDP rule is a second authorization, not ANDed with HTTP matches a datagram lacks.
        let yaml = format!(
            "{ROUTES}{udp}{}",
            target(
                "  - {kind: HTTPRouteGroup, name: api, matches: [metrics]}\n  - {kind: UDPRoute, name: dns}\n"
            )
        );
        let (p, _) = resolve_for(&yaml, 5353, false);
        assert_eq!(p.authorizations.len(), 2, "{:?}", p.authorizations);
        assert!(p.authorizations[0].protocols.is_empty());
        assert_eq!(p.authorizations[0].routes.len(), 1);
        assert_eq!(
            p.authorizations[1].protocols,
            vec![v1::L4Protocol::Udp as i32]
        );

        // A UDPRoute that goes (the files source keeps the last good target) is reported and
        // allows nothing.
        let yaml = target("  - {kind: UDPRoute, name: nope}\n")
            + "---\napiVersion: specs.smi-spec.io/v1alpha4\nkind: UDPRoute\nmetadata: {name: nope, namespace: demo}\nspec:\n  matches:\n    ports: [5353]\n";
        let mut set = crate::index::policy::tests::located_set("t.yaml", &yaml);
        set.policies
            .retain(|p| !matches!(p, trellis_smi::model::Policy::UdpRoute(_)));
        let view = PolicyView::build(&[("t".into(), set)]);
        let (p, problems) = resolve(&view, "demo", "web", 5353, &options(false));
        assert!(p.authorizations.is_empty());
        assert!(
            problems.iter().any(|p| p
                .message
                .contains("UDPRoute demo/nope is referenced but missing")),
            "{problems:?}"
        );
    }

    #[test]
    fn other_destinations_and_missing_routes_allow_nothing() {
        let yaml = format!(
            "{ROUTES}{}",
            target("  - {kind: HTTPRouteGroup, name: api}\n")
        );
        let (p, _) = resolve(&view(&yaml), "demo", "other", 8080, &options(false));
        assert!(p.authorizations.is_empty());
        let (p, _) = resolve(&view(&yaml), "shop", "web", 8080, &options(false));
        assert!(p.authorizations.is_empty());

        // The target (document on line 2 of t.yaml) names a TCPRoute that then goes (the files
        // source keeps the last good target; on Kubernetes the route is simply deleted).
        let yaml = target("  - {kind: TCPRoute, name: nope}\n")
            + "---\napiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata: {name: nope, namespace: demo}\nspec:\n  matches:\n    ports: [8080]\n";
        let mut set = crate::index::policy::tests::located_set("t.yaml", &yaml);
        set.policies
            .retain(|p| !matches!(p, trellis_smi::model::Policy::TcpRoute(_)));
        let view = PolicyView::build(&[("t".into(), set)]);
        let (p, problems) = resolve(&view, "demo", "web", 8080, &options(false));
        assert!(p.authorizations.is_empty());
        assert_eq!(
            problems,
            [PolicyProblem {
                resource: "TrafficTarget demo/t".into(),
                location: "t.yaml:2".into(),
                message: "TCPRoute demo/nope is referenced but missing: that rule allows nothing"
                    .into(),
            }]
        );
    }

    #[test]
    fn the_old_destination_port_restricts_the_port() {
        let yaml = format!(
            "{ROUTES}---
apiVersion: access.smi-spec.io/v1alpha2
kind: TrafficTarget
metadata: {{name: old, namespace: demo}}
spec:
  destination: {{kind: ServiceAccount, name: web, namespace: demo, port: 8080}}
  sources:
  - {{kind: ServiceAccount, name: client, namespace: demo}}
  rules:
  - {{kind: HTTPRouteGroup, name: api}}
"
        );
        let (p, _) = resolve_for(&yaml, 8080, false);
        assert_eq!(p.authorizations.len(), 1, "{p:?}");
        assert_eq!(p.authorizations[0].ports, vec![8080]);
        assert_eq!(p.authorizations[0].routes.len(), 2);
        let (p, _) = resolve_for(&yaml, 8081, false);
        assert!(p.authorizations.is_empty());
    }

    fn switches(access: AccessSwitches) -> IndexOptions {
        IndexOptions {
            access,
            ..IndexOptions::default()
        }
    }

    #[test]
    fn access_logs_are_asked_of_the_listed_namespaces_only() {
        let options = IndexOptions {
            access_log_namespaces: vec!["demo".into()],
            ..IndexOptions::default()
        };
        let (p, _) = resolve(&view(""), "demo", "web", 8080, &options);
        assert!(p.access_log);
        let (p, _) = resolve(&view(""), "other", "web", 8080, &options);
        assert!(!p.access_log);
        let (p, _) = resolve_for("", 8080, false);
        assert!(!p.access_log, "off unless asked for");
    }

    #[test]
    fn targets_are_ored_each_one_authorization() {
        let yaml = format!(
            "{ROUTES}{}---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {{name: t2, namespace: demo}}
spec:
  destination: {{kind: ServiceAccount, name: web, namespace: demo}}
  sources:
  - {{kind: ServiceAccount, name: monitor, namespace: ops}}
  rules:
  - {{kind: TCPRoute, name: web-port}}
",
            target("  - {kind: HTTPRouteGroup, name: api, matches: [metrics]}\n")
        );
        let (p, _) = resolve_for(&yaml, 8080, false);
        assert_eq!(p.authorizations.len(), 2, "{p:?}");
        let ids: Vec<&str> = p
            .authorizations
            .iter()
            .flat_map(|a| a.identities.iter().map(String::as_str))
            .collect();
        assert!(ids.contains(&"spiffe://cluster.local/ns/demo/sa/client"));
        assert!(ids.contains(&"spiffe://cluster.local/ns/ops/sa/monitor"));
        // On another port only the HTTPRouteGroup target (any port) still applies.
        let (p, _) = resolve_for(&yaml, 9090, false);
        assert_eq!(p.authorizations.len(), 1);
        assert_eq!(
            p.authorizations[0].identities,
            vec!["spiffe://cluster.local/ns/demo/sa/client"]
        );
    }

    #[test]
    fn a_target_without_rules_or_sources_allows_nothing() {
        // Built directly: the loader (rightly) refuses such targets in v1alpha3 YAML, but other
        // sources or older versions may still hand one over.
        let yaml = format!(
            "{ROUTES}{}",
            target("  - {kind: TCPRoute, name: web-port}\n")
        );
        let mut view = view(&yaml);
        let mut no_rules = view.access[0].clone();
        no_rules.rules.clear();
        let mut no_sources = view.access[0].clone();
        no_sources.sources.clear();
        view.access = vec![no_rules];
        let (p, _) = resolve(&view, "demo", "web", 8080, &options(false));
        assert!(p.authorizations.is_empty(), "no rules: {p:?}");
        view.access = vec![no_sources];
        let (p, _) = resolve(&view, "demo", "web", 8080, &options(false));
        assert!(p.authorizations.is_empty(), "no sources: {p:?}");
        assert_eq!(p.default_action, v1::DefaultAction::Deny as i32);
    }

    #[test]
    fn the_v1alpha1_destination_port_restricts_the_port() {
        let yaml = format!(
            "{ROUTES}---
apiVersion: access.smi-spec.io/v1alpha1
kind: TrafficTarget
metadata: {{name: oldest, namespace: demo}}
destination: {{kind: ServiceAccount, name: web, namespace: demo, port: 8080}}
sources:
- {{kind: ServiceAccount, name: client, namespace: demo}}
specs:
- {{kind: HTTPRouteGroup, name: api, matches: [metrics]}}
"
        );
        let (p, _) = resolve_for(&yaml, 8080, false);
        assert_eq!(p.authorizations.len(), 1, "{p:?}");
        assert_eq!(p.authorizations[0].ports, vec![8080]);
        assert_eq!(p.authorizations[0].routes.len(), 1);
        let (p, _) = resolve_for(&yaml, 9090, false);
        assert!(p.authorizations.is_empty());
    }

    #[test]
    fn permissive_namespace_allows_by_default_only_there() {
        let opts = switches(AccessSwitches {
            permissive_namespaces: vec!["demo".into()],
            ..AccessSwitches::default()
        });
        let (p, _) = resolve(&view(""), "demo", "web", 8080, &opts);
        assert_eq!(p.default_action, v1::DefaultAction::Allow as i32);
        assert!(p.authorizations.is_empty());
        let (p, _) = resolve(&view(""), "shop", "web", 8080, &opts);
        assert_eq!(p.default_action, v1::DefaultAction::Deny as i32);
    }

    #[test]
    fn plaintext_from_adds_one_unauthenticated_rule_for_every_workload() {
        let opts = switches(AccessSwitches {
            plaintext_from: vec![
                parse_cidr("10.0.0.0/8").unwrap(),
                parse_cidr("127.0.0.1").unwrap(),
            ],
            ..AccessSwitches::default()
        });
        let yaml = format!(
            "{ROUTES}{}",
            target("  - {kind: TCPRoute, name: web-port}\n")
        );
        for (ns, name, targets) in [("demo", "web", 1), ("shop", "db", 0)] {
            let (p, _) = resolve(&view(&yaml), ns, name, 8080, &opts);
            assert_eq!(p.authorizations.len(), targets + 1, "{ns}/{name}: {p:?}");
            let a = p.authorizations.last().unwrap();
            assert!(a.unauthenticated);
            assert!(a.identities.is_empty() && a.ports.is_empty() && a.routes.is_empty());
            assert_eq!(a.networks, vec!["10.0.0.0/8", "127.0.0.1/32"]);
            assert_eq!(p.default_action, v1::DefaultAction::Deny as i32);
        }
    }

    #[test]
    fn plaintext_namespace_admits_plaintext_from_anywhere_only_there() {
        let opts = switches(AccessSwitches {
            plaintext_namespaces: vec!["ingress".into()],
            ..AccessSwitches::default()
        });
        let (p, _) = resolve(&view(""), "ingress", "gateway", 443, &opts);
        assert_eq!(p.authorizations.len(), 1);
        let a = &p.authorizations[0];
        assert!(a.unauthenticated && a.networks.is_empty() && a.identities.is_empty());
        let (p, _) = resolve(&view(""), "demo", "web", 443, &opts);
        assert!(p.authorizations.is_empty());
    }

    #[test]
    fn cidrs_are_checked_with_a_clear_message() {
        assert_eq!(parse_cidr("fd00::/8").unwrap().to_string(), "fd00::/8");
        assert_eq!(parse_cidr("::1").unwrap().to_string(), "::1/128");
        let err = parse_cidr("10.0.0.1/8").unwrap_err();
        assert!(err.contains("did you mean 10.0.0.0/8"), "{err}");
        let err = parse_cidr("10.0.0.0/33").unwrap_err();
        assert!(err.contains("not a CIDR"), "{err}");
        assert!(parse_cidr("everywhere").is_err());
    }

    #[test]
    fn http_matches_keep_path_methods_and_headers_and_only_the_named_ones() {
        let yaml = format!(
            "---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {{name: api, namespace: demo}}
spec:
  matches:
  - {{name: mobile, pathRegex: '/api/.*', methods: [GET, POST], headers: [{{user-agent: '.*Android.*'}}]}}
  - {{name: admin, pathRegex: /admin}}
  - {{name: other, pathRegex: /other}}
{}",
            target("  - {kind: HTTPRouteGroup, name: api, matches: [mobile, admin]}\n")
        );
        let (p, _) = resolve_for(&yaml, 8080, false);
        let routes = &p.authorizations[0].routes;
        assert_eq!(routes.len(), 2, "only the named matches: {routes:?}");
        assert_eq!(routes[0].path_regex, "/api/.*");
        assert_eq!(routes[0].methods, vec!["GET", "POST"]);
        assert_eq!(
            routes[0].headers.get("user-agent").map(String::as_str),
            Some(".*Android.*")
        );
        assert_eq!(routes[1].path_regex, "/admin");
        assert!(routes[1].methods.is_empty() && routes[1].headers.is_empty());
    }

    #[test]
    fn rate_limits_go_to_the_workloads_behind_the_target_on_the_port_they_serve_it() {
        use crate::index::policy::tests::traffic_policy;
        use std::sync::Arc;
        use trellis_discovery::{
            Endpoint, EndpointPort, EndpointSet, Provenance, Readiness, ServicePort,
        };
        let spec = "  rateLimit: {requestsPerSecond: 100, perSource: true}
  routes:
  - {httpRouteGroup: api, matches: [metrics], rateLimit: {requestsPerSecond: 1, burst: 2}}
  - {httpRouteGroup: api, timeouts: {request: 1s}}
";
        let view = view(&format!(
            "{ROUTES}{}",
            traffic_policy("limits", "web-svc", None, spec)
        ));
        // The Service web-svc (port 80) is served by pods running as web, on 8080.
        let snapshot = Snapshot::Endpoints(EndpointSet {
            service: ServiceKey::new("demo", "web-svc"),
            ports: vec![ServicePort {
                name: None,
                port: 80,
                protocol: None,
            }],
            endpoints: vec![Endpoint {
                address: "10.0.0.1".parse().unwrap(),
                ports: vec![EndpointPort {
                    name: None,
                    port: 8080,
                }],
                readiness: Readiness::Ready,
                identity: WorkloadIdentity::new("demo", "web"),
                owner: None,
                labels: Default::default(),
                weight: None,
                zone: None,
                protocol: None,
                provenance: Provenance {
                    source: Arc::from("test"),
                    confirmed_at: std::time::SystemTime::UNIX_EPOCH,
                },
            }],
        });
        let key = ServiceKey::new("demo", "web-svc");
        let lookup = |k: &ServiceKey| (*k == key).then_some(&snapshot);
        let limits = rate_limits(&view, "demo", "web", 8080, &lookup);
        let summary: Vec<(String, usize, f64, u32, bool)> = limits
            .iter()
            .map(|l| {
                (
                    l.name.clone(),
                    l.matches.len(),
                    l.requests_per_second,
                    l.burst,
                    l.per_source,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("demo/web-svc/api".into(), 1, 1.0, 2, false),
                ("demo/web-svc".into(), 0, 100.0, 0, true),
            ],
            "the route's limit first, with its matches; the service's last, with none"
        );
        assert_eq!(limits[0].matches[0].path_regex, "/metrics");
        // Not on another port, not for another workload, not before discovery answers.
        assert!(rate_limits(&view, "demo", "web", 9090, &lookup).is_empty());
        assert!(rate_limits(&view, "demo", "client", 8080, &lookup).is_empty());
        assert!(rate_limits(&view, "demo", "web", 8080, &|_| None).is_empty());
    }

    /// Discovery's answer for `demo/{service}` (port 80): one endpoint running as `demo/{sa}`,
    /// serving it on `port`.
    fn served_by(service: &str, sa: &str, port: u16) -> Snapshot {
        use std::sync::Arc;
        use trellis_discovery::{
            Endpoint, EndpointPort, EndpointSet, Provenance, Readiness, ServicePort,
        };
        Snapshot::Endpoints(EndpointSet {
            service: ServiceKey::new("demo", service),
            ports: vec![ServicePort {
                name: None,
                port: 80,
                protocol: None,
            }],
            endpoints: vec![Endpoint {
                address: "10.0.0.1".parse().unwrap(),
                ports: vec![EndpointPort { name: None, port }],
                readiness: Readiness::Ready,
                identity: WorkloadIdentity::new("demo", sa),
                owner: None,
                labels: Default::default(),
                weight: None,
                zone: None,
                protocol: None,
                provenance: Provenance {
                    source: Arc::from("test"),
                    confirmed_at: std::time::SystemTime::UNIX_EPOCH,
                },
            }],
        })
    }

    fn jwt_spec(issuer: &str, extra: &str) -> String {
        format!(
            "  jwt:
    required: true
    providers:
    - {{issuer: '{issuer}', audiences: [web], jwks: {{file: /etc/jwks.json}}}}
{extra}"
        )
    }

    #[test]
    fn jwt_and_claims_reach_the_workloads_behind_the_target_as_requirements_no_rule_can_waive() {
        use crate::index::policy::tests::traffic_policy;
        let spec = jwt_spec(
            "https://auth",
            "  claims:
  - {claim: aud, values: [web]}
  routes:
  - {httpRouteGroup: api, matches: [metrics], claims: [{claim: role, values: [admin]}]}
  - {httpRouteGroup: api, timeouts: {request: 1s}}
",
        );
        // Two TrafficTargets: one allows only /metrics, the other the whole port (TCPRoute):
        // ORed, the second allows /metrics too, whatever claims a rule carried.
        let yaml = format!(
            "{ROUTES}{}---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {{name: all, namespace: demo}}
spec:
  destination: {{kind: ServiceAccount, name: web, namespace: demo}}
  sources:
  - {{kind: ServiceAccount, name: client, namespace: demo}}
  rules:
  - {{kind: TCPRoute, name: web-port}}
{}",
            target("  - {kind: HTTPRouteGroup, name: api, matches: [metrics]}\n"),
            traffic_policy("auth", "web-svc", None, &spec)
        );
        let view = view(&yaml);
        let snapshot = served_by("web-svc", "web", 8080);
        let key = ServiceKey::new("demo", "web-svc");
        let lookup = |k: &ServiceKey| (*k == key).then_some(&snapshot);
        let got = end_user(&view, "demo", "web", 8080, &lookup);
        assert!(!got.refuse && got.problems.is_empty(), "{got:?}");
        let jwt = got.jwt.as_ref().expect("the policy's jwt");
        assert!(jwt.required);
        assert_eq!(jwt.providers[0].issuer, "https://auth");
        let summary: Vec<(&str, Vec<&str>, Vec<&str>)> = got
            .claim_requirements
            .iter()
            .map(|r| {
                (
                    r.name.as_str(),
                    r.matches.iter().map(|m| m.path_regex.as_str()).collect(),
                    r.claims.iter().map(|c| c.claim.as_str()).collect(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("demo/web-svc/api", vec!["/metrics"], vec!["role"]),
                ("demo/web-svc", vec![], vec!["aud"]),
            ],
            "the route section's requirement (its matches), then the service's (every request)"
        );
        // The authorizations are the TrafficTargets' alone: the claims are not folded into a
        // rule that the allow-everything target would bypass.
        let (p, _) = resolve(&view, "demo", "web", 8080, &options(false));
        assert_eq!(p.authorizations.len(), 2, "{p:?}");
        assert!(p.authorizations.iter().all(|a| a.claims.is_empty()));
        assert!(
            p.authorizations.iter().any(|a| a.routes.is_empty()),
            "the TCPRoute target allows every request"
        );
        // Not on another port, not for another workload; a Service that does not exist
        // concerns nobody.
        assert_eq!(
            end_user(&view, "demo", "web", 9090, &lookup),
            EndUser::default()
        );
        assert_eq!(
            end_user(&view, "demo", "client", 8080, &lookup),
            EndUser::default()
        );
        let gone = Snapshot::NotFound;
        assert_eq!(
            end_user(&view, "demo", "web", 8080, &|_| Some(&gone)),
            EndUser::default()
        );
        // Before discovery answers, any workload of the namespace may be behind the target:
        // closed, silently (it lasts until the first answer).
        let pending = end_user(&view, "demo", "client", 8080, &|_| None);
        assert!(pending.refuse && pending.jwt.is_none() && pending.claim_requirements.is_empty());
        assert!(pending.problems.is_empty());
    }

    #[test]
    fn two_services_with_different_jwts_on_one_workload_port_close_it_naming_both() {
        use crate::index::policy::tests::traffic_policy;
        // svc-c: a's jwt, and a claim on every request.
        let policy_c = || {
            traffic_policy(
                "c",
                "svc-c",
                None,
                &jwt_spec("https://a", "  claims: [{claim: role, values: [x]}]\n"),
            )
        };
        let yaml = format!(
            "{ROUTES}{}{}{}",
            traffic_policy("a", "svc-a", None, &jwt_spec("https://a", "")),
            traffic_policy("b", "svc-b", None, &jwt_spec("https://b", "")),
            policy_c(),
        );
        let view = view(&yaml);
        let (a, b, c) = (
            served_by("svc-a", "web", 8080),
            served_by("svc-b", "web", 8080),
            served_by("svc-c", "web", 8080),
        );
        let lookup = |k: &ServiceKey| match k.name.as_str() {
            "svc-a" => Some(&a),
            "svc-b" => Some(&b),
            "svc-c" => Some(&c),
            _ => None,
        };
        let got = end_user(&view, "demo", "web", 8080, &lookup);
        assert!(got.refuse, "{got:?}");
        assert!(got.jwt.is_none() && got.claim_requirements.is_empty());
        assert_eq!(got.problems.len(), 1, "{:?}", got.problems);
        let problem = &got.problems[0];
        assert_eq!(problem.resource, "TrafficPolicy demo/b");
        assert!(
            problem
                .message
                .contains("TrafficPolicy demo/a (at test.yaml:")
                && problem
                    .message
                    .contains("workload demo/web serves both on port 8080"),
            "{problem:?}"
        );
        // The same jwt on two services (a and c) is one policy for the port: both apply.
        let no_b = |k: &ServiceKey| if k.name == "svc-b" { None } else { lookup(k) };
        let view_ac = crate::index::policy::tests::view(&format!(
            "{ROUTES}{}{}",
            traffic_policy("a", "svc-a", None, &jwt_spec("https://a", "")),
            policy_c(),
        ));
        let got = end_user(&view_ac, "demo", "web", 8080, &no_b);
        assert!(!got.refuse, "{got:?}");
        assert_eq!(got.jwt.unwrap().providers[0].issuer, "https://a");
        assert_eq!(got.claim_requirements.len(), 1);
        assert_eq!(got.claim_requirements[0].name, "demo/svc-c");
    }

    #[test]
    fn a_policy_with_claims_that_cannot_be_applied_closes_the_port() {
        use crate::index::policy::tests::traffic_policy;
        // The route section's group goes (the files source keeps the last good policy; on
        // Kubernetes the group is simply deleted): the policy is not applied (its resilience
        // settings are left out), but leaving its claims out would open /metrics.
        let spec = jwt_spec(
            "https://auth",
            "  routes:\n  - {httpRouteGroup: api, matches: [metrics], claims: [{claim: role, values: [admin]}]}\n",
        );
        let mut set = crate::index::policy::tests::located_set(
            "t.yaml",
            &format!("{ROUTES}{}", traffic_policy("auth", "web-svc", None, &spec)),
        );
        set.policies
            .retain(|p| !matches!(p, trellis_smi::model::Policy::HttpRouteGroup(_)));
        let view = PolicyView::build(&[("t".into(), set)]);
        assert!(
            view.traffic_broken
                .contains(&ServiceKey::new("demo", "web-svc"))
        );
        let snapshot = served_by("web-svc", "web", 8080);
        let got = end_user(&view, "demo", "web", 8080, &|_| Some(&snapshot));
        assert!(got.refuse && got.jwt.is_none(), "{got:?}");
        assert_eq!(got.problems.len(), 1);
        assert_eq!(got.problems[0].resource, "TrafficPolicy demo/auth");
        assert!(
            got.problems[0]
                .message
                .contains("workload demo/web refuses every request on port 8080"),
            "{:?}",
            got.problems[0]
        );
    }
}
