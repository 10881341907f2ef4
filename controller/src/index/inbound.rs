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
//! - A rule naming a route that does not exist is dropped (reported): access is never widened.
//!   A target left with no rule allows nothing.
//! - Default deny; `--permissive` (mesh-wide, explicit, reported in the state) makes it allow.
//! - Callers carry no verified identity until mTLS lands, so `unauthenticated` stays false:
//!   until then only permissive mode lets plaintext callers in.

use trellis_discovery::WorkloadIdentity;
use trellis_proxy_api::v1;
use trellis_smi::model::{AccessPolicy, RouteKind, effective_namespace};

use super::policy::PolicyView;
use crate::policy::PolicyProblem;

/// The inbound policy of `namespace/name` on `port` (version left empty) and its problems.
pub fn resolve(
    view: &PolicyView,
    namespace: &str,
    name: &str,
    port: u16,
    trust_domain: &str,
    permissive: bool,
) -> (v1::InboundPolicy, Vec<PolicyProblem>) {
    let mut problems = Vec::new();
    let mut authorizations = Vec::new();
    for target in &view.access {
        let ns = effective_namespace(&target.metadata);
        let dest_ns = target.destination.namespace.as_deref().unwrap_or(ns);
        if dest_ns != namespace || target.destination.name != name {
            continue;
        }
        if let Some(authz) = authorization(view, target, port, trust_domain, &mut problems) {
            authorizations.push(authz);
        }
    }
    let policy = v1::InboundPolicy {
        version: String::new(),
        protocol: v1::Protocol::Unspecified as i32,
        authorizations,
        default_action: if permissive {
            v1::DefaultAction::Allow
        } else {
            v1::DefaultAction::Deny
        } as i32,
    };
    (policy, problems)
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
            location: "policy".into(),
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
            RouteKind::UdpRoute => {} // UDP is not proxied yet
        }
    }
    if !has_http_rule && !has_port_rule {
        return None; // no usable rule: allows nothing
    }
    if has_http_rule && routes.is_empty() {
        return None; // only unknown match names: allows nothing
    }
    // Empty = every port (no TCPRoute, or one with `ports: []`).
    let mut ports = if every_port { Vec::new() } else { port_list };
    if let Some(p) = target.destination_port {
        if !ports.is_empty() && !ports.contains(&p) {
            return None; // TCPRoute ports AND destination port: disjoint
        }
        ports = vec![p];
    }
    ports.sort_unstable();
    ports.dedup();
    if !ports.is_empty() && !ports.contains(&port) {
        return None;
    }
    let identities = target
        .sources
        .iter()
        .map(|s| {
            let source_ns = s.namespace.as_deref().unwrap_or(ns);
            WorkloadIdentity::new(source_ns, &s.name).spiffe_id(trust_domain)
        })
        .collect();
    Some(v1::Authorization {
        identities,
        ports: ports.into_iter().map(u32::from).collect(),
        routes,
        unauthenticated: false,
        networks: Vec::new(),
    })
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

    fn resolve_for(
        yaml: &str,
        port: u16,
        permissive: bool,
    ) -> (v1::InboundPolicy, Vec<PolicyProblem>) {
        resolve(
            &view(yaml),
            "demo",
            "web",
            port,
            "cluster.local",
            permissive,
        )
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
    fn other_destinations_and_missing_routes_allow_nothing() {
        let yaml = format!(
            "{ROUTES}{}",
            target("  - {kind: HTTPRouteGroup, name: api}\n")
        );
        let (p, _) = resolve(&view(&yaml), "demo", "other", 8080, "cluster.local", false);
        assert!(p.authorizations.is_empty());
        let (p, _) = resolve(&view(&yaml), "shop", "web", 8080, "cluster.local", false);
        assert!(p.authorizations.is_empty());

        let missing = target("  - {kind: TCPRoute, name: nope}\n");
        let report = trellis_smi::load::load_str("t.yaml", &missing);
        let view = PolicyView::build(&[(
            "t".into(),
            crate::policy::PolicySet {
                policies: report.resources.into_iter().map(|r| r.policy).collect(),
                problems: vec![],
            },
        )]);
        let (p, problems) = resolve(&view, "demo", "web", 8080, "cluster.local", false);
        assert!(p.authorizations.is_empty());
        if !view.access.is_empty() {
            assert!(
                problems[0].message.contains("TCPRoute demo/nope"),
                "{problems:?}"
            );
        }
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
}
