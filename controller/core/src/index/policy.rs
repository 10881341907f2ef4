//! The merged policy of every source, indexed the way the resolvers read it: splits per root
//! service (in precedence order), route groups and TCP routes by name, access policies.
//!
//! Building a view also finds the problems that need no discovery: splits whose weights sum to
//! 0, several splits for one root, route groups referenced but missing, one resource held by
//! two sources.
//!
//! Two views are diffed ([`PolicyView::changed_roots`], [`PolicyView::changed_workloads`]) so a
//! policy change recomputes only the destinations and inbound policies it touches: the diff is
//! linear in the policy, never in the number of destinations, streams or endpoints.

use std::collections::{BTreeMap, HashMap, HashSet};

use trellis_discovery::ServiceKey;
use trellis_smi::model::{
    AccessPolicy, HttpRouteGroup, Policy, PortRoute, TrafficSplit, effective_namespace,
};

use crate::policy::{PolicyProblem, PolicySet};

/// `(namespace, name)` of a namespaced resource.
pub type Named = (String, String);

/// The merged policy in force, indexed.
#[derive(Clone, Debug, Default)]
pub struct PolicyView {
    /// Splits per root service, the one in force first (oldest creationTimestamp, then name).
    pub splits: HashMap<ServiceKey, Vec<TrafficSplit>>,
    pub route_groups: HashMap<Named, HttpRouteGroup>,
    pub tcp_routes: HashMap<Named, PortRoute>,
    pub access: Vec<AccessPolicy>,
    /// Every resource in force, sorted by kind, namespace, name.
    pub policies: Vec<Policy>,
    /// Source problems plus the problems found while merging.
    pub problems: Vec<PolicyProblem>,
}

/// What one destination's profile depends on in the policy: compared across policy changes so
/// only destinations whose inputs changed are recomputed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DestinationPolicy {
    /// The split in force for the root (inactive ones included: the resolver reports them).
    pub split: Option<TrafficSplit>,
    /// The route groups the split's `matches` name, `None` where missing (in `matches` order).
    pub groups: Vec<(String, Option<HttpRouteGroup>)>,
}

fn named(policy: &Policy) -> Named {
    let meta = policy.metadata();
    (
        effective_namespace(meta).to_owned(),
        meta.name.clone().unwrap_or_default(),
    )
}

fn split_id(split: &TrafficSplit) -> String {
    format!(
        "TrafficSplit {}/{}",
        effective_namespace(&split.metadata),
        split.metadata.name.as_deref().unwrap_or_default()
    )
}

impl PolicyView {
    /// Merges the sets of every source, in source order (a resource two sources hold: the first
    /// source's version is used, reported).
    pub fn build(sources: &[(String, PolicySet)]) -> Self {
        let borrowed: Vec<(&str, &PolicySet)> =
            sources.iter().map(|(n, s)| (n.as_str(), s)).collect();
        Self::build_from(&borrowed)
    }

    /// [`PolicyView::build`] over borrowed sets (the index keeps the sets; no copy of them).
    pub fn build_from(sources: &[(&str, &PolicySet)]) -> Self {
        let mut view = PolicyView::default();
        let mut by_id = BTreeMap::new();
        for &(source, set) in sources {
            view.problems.extend(set.problems.iter().cloned());
            for policy in &set.policies {
                let id = policy.id();
                if by_id.contains_key(&id) {
                    view.problems.push(PolicyProblem {
                        resource: id.to_string(),
                        location: source.to_owned(),
                        message: "also held by an earlier policy source; that version is used"
                            .into(),
                    });
                    continue;
                }
                by_id.insert(id, policy);
            }
        }
        for policy in by_id.values() {
            match policy {
                Policy::TrafficSplit(split) => {
                    let root =
                        ServiceKey::new(effective_namespace(&split.metadata), &split.service);
                    view.splits.entry(root).or_default().push(split.clone());
                }
                Policy::HttpRouteGroup(group) => {
                    view.route_groups.insert(named(policy), group.clone());
                }
                Policy::TcpRoute(route) => {
                    view.tcp_routes.insert(named(policy), route.clone());
                }
                Policy::UdpRoute(_) => {} // UDP is not proxied yet; kept in `policies` for the record.
                Policy::AccessPolicy(access) => view.access.push(access.clone()),
            }
        }
        view.policies = by_id.into_values().cloned().collect();
        for (root, splits) in &mut view.splits {
            splits.sort_by(|a, b| {
                let age = |s: &TrafficSplit| {
                    // Splits without a creationTimestamp (files) come after dated ones.
                    (
                        s.metadata.creation_timestamp.is_none(),
                        s.metadata.creation_timestamp.clone(),
                    )
                };
                age(a)
                    .cmp(&age(b))
                    .then_with(|| a.metadata.name.cmp(&b.metadata.name))
            });
            if splits.len() > 1 {
                let others: Vec<String> = splits[1..].iter().map(split_id).collect();
                view.problems.push(PolicyProblem {
                    resource: split_id(&splits[0]),
                    location: format!("root {root}"),
                    message: format!(
                        "several splits for one root: this one (oldest, then by name) is in force; ignored: {}",
                        others.join(", ")
                    ),
                });
            }
        }
        let mut split_problems = Vec::new();
        for splits in view.splits.values() {
            for split in splits {
                if split.backends.iter().all(|b| b.weight.milli() == 0) {
                    split_problems.push(PolicyProblem {
                        resource: split_id(split),
                        location: "policy".into(),
                        message: "weights sum to 0: the split is inactive and traffic goes to the root service".into(),
                    });
                }
                let ns = effective_namespace(&split.metadata);
                for group in &split.matches {
                    if !view
                        .route_groups
                        .contains_key(&(ns.to_owned(), group.name.clone()))
                    {
                        split_problems.push(PolicyProblem {
                            resource: split_id(split),
                            location: "policy".into(),
                            message: format!(
                                "HTTPRouteGroup {ns}/{} is referenced but missing: its requests go to the root service",
                                group.name
                            ),
                        });
                    }
                }
            }
        }
        split_problems.sort_by(|a, b| (&a.resource, &a.message).cmp(&(&b.resource, &b.message)));
        view.problems.extend(split_problems);
        view
    }

    /// The roots whose [`DestinationPolicy`] differs between `old` and `self` (split in force or
    /// the route groups it names). Linear in the splits of both views.
    pub fn changed_roots(&self, old: &PolicyView) -> HashSet<ServiceKey> {
        self.splits
            .keys()
            .chain(old.splits.keys())
            .filter(|root| self.destination_ref(root) != old.destination_ref(root))
            .cloned()
            .collect()
    }

    /// The workloads (`namespace/name` of TrafficTarget destinations) whose inbound policy may
    /// differ between `old` and `self`; `None` = any of them (an HTTPRouteGroup or TCPRoute
    /// changed: targets name routes, so every target may read it).
    pub fn changed_workloads(&self, old: &PolicyView) -> Option<HashSet<ServiceKey>> {
        if self.route_groups != old.route_groups || self.tcp_routes != old.tcp_routes {
            return None;
        }
        let (new, old) = (self.access_by_workload(), old.access_by_workload());
        Some(
            new.keys()
                .chain(old.keys())
                .filter(|w| new.get(*w) != old.get(*w))
                .cloned()
                .collect(),
        )
    }

    /// The TrafficTargets per destination workload, in view order.
    fn access_by_workload(&self) -> HashMap<ServiceKey, Vec<&AccessPolicy>> {
        let mut out: HashMap<ServiceKey, Vec<&AccessPolicy>> = HashMap::new();
        for target in &self.access {
            let ns = effective_namespace(&target.metadata);
            let dest_ns = target.destination.namespace.as_deref().unwrap_or(ns);
            out.entry(ServiceKey::new(dest_ns, &target.destination.name))
                .or_default()
                .push(target);
        }
        out
    }

    /// [`PolicyView::destination`] without copies, for comparisons.
    fn destination_ref(
        &self,
        root: &ServiceKey,
    ) -> Option<(&TrafficSplit, Vec<Option<&HttpRouteGroup>>)> {
        let split = self.splits.get(root)?.first()?;
        let ns = effective_namespace(&split.metadata);
        let groups = split
            .matches
            .iter()
            .map(|g| self.route_groups.get(&(ns.to_owned(), g.name.clone())))
            .collect();
        Some((split, groups))
    }

    /// What the profile of `root` depends on.
    pub fn destination(&self, root: &ServiceKey) -> DestinationPolicy {
        let Some(split) = self.splits.get(root).and_then(|s| s.first()) else {
            return DestinationPolicy::default();
        };
        let ns = effective_namespace(&split.metadata).to_owned();
        DestinationPolicy {
            groups: split
                .matches
                .iter()
                .map(|g| {
                    let group = self
                        .route_groups
                        .get(&(ns.clone(), g.name.clone()))
                        .cloned();
                    (g.name.clone(), group)
                })
                .collect(),
            split: Some(split.clone()),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use trellis_smi::load::load_str;

    /// The policies of `yaml`, which must load cleanly.
    pub(crate) fn policies(yaml: &str) -> Vec<Policy> {
        let report = load_str("test.yaml", yaml);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        report.resources.into_iter().map(|r| r.policy).collect()
    }

    pub(crate) fn view(yaml: &str) -> PolicyView {
        PolicyView::build(&[(
            "test".into(),
            PolicySet {
                policies: policies(yaml),
                problems: vec![],
            },
        )])
    }

    pub(crate) fn split(
        name: &str,
        root: &str,
        backends: &[(&str, u32)],
        created: Option<&str>,
    ) -> String {
        let created = created
            .map(|c| format!(", creationTimestamp: \"{c}\""))
            .unwrap_or_default();
        let mut out = format!(
            "---\napiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {{name: {name}, namespace: demo{created}}}\nspec:\n  service: {root}\n  backends:\n"
        );
        for (service, weight) in backends {
            out.push_str(&format!("  - {{service: {service}, weight: {weight}}}\n"));
        }
        out
    }

    #[test]
    fn several_splits_for_one_root_the_oldest_wins_then_the_name_and_it_is_reported() {
        let yaml = [
            split(
                "b-new",
                "web",
                &[("web-v1", 1)],
                Some("2024-01-02T00:00:00Z"),
            ),
            split(
                "c-old",
                "web",
                &[("web-v2", 1)],
                Some("2024-01-01T00:00:00Z"),
            ),
            split("a-undated", "web", &[("web-v3", 1)], None),
        ]
        .concat();
        let merged = view(&yaml);
        let order: Vec<_> = merged.splits[&ServiceKey::new("demo", "web")]
            .iter()
            .map(|s| s.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(order, ["c-old", "b-new", "a-undated"]);
        let d = merged.destination(&ServiceKey::new("demo", "web"));
        assert_eq!(d.split.unwrap().metadata.name.as_deref(), Some("c-old"));
        assert_eq!(merged.problems.len(), 1, "{:?}", merged.problems);
        assert!(merged.problems[0].message.contains("several splits"));
        assert!(
            merged.problems[0]
                .message
                .contains("TrafficSplit demo/b-new")
        );

        let by_name = view(
            &[
                split("b", "web", &[("x", 1)], None),
                split("a", "web", &[("y", 1)], None),
            ]
            .concat(),
        );
        let d = by_name.destination(&ServiceKey::new("demo", "web"));
        assert_eq!(d.split.unwrap().metadata.name.as_deref(), Some("a"));
    }

    #[test]
    fn weights_summing_to_zero_and_missing_route_groups_are_reported() {
        let mut yaml = split("zero", "web", &[("web-v1", 0), ("web-v2", 0)], None);
        yaml.push_str(&split("routed", "api", &[("api-v2", 1)], None));
        yaml.push_str("  matches:\n  - {kind: HTTPRouteGroup, name: missing}\n");
        let report = load_str("test.yaml", &yaml);
        // The loader itself may already refuse a split naming a missing group; either way it is reported.
        let view = PolicyView::build(&[(
            "test".into(),
            PolicySet {
                policies: report.resources.into_iter().map(|r| r.policy).collect(),
                problems: vec![],
            },
        )]);
        assert!(
            view.problems
                .iter()
                .any(|p| p.resource == "TrafficSplit demo/zero" && p.message.contains("sum to 0")),
            "{:?}",
            view.problems
        );
        if view.splits.contains_key(&ServiceKey::new("demo", "api")) {
            assert!(
                view.problems
                    .iter()
                    .any(|p| p.message.contains("HTTPRouteGroup demo/missing")),
                "{:?}",
                view.problems
            );
            let d = view.destination(&ServiceKey::new("demo", "api"));
            assert_eq!(d.groups, vec![("missing".to_string(), None)]);
        }
    }

    #[test]
    fn a_resource_two_sources_hold_is_taken_from_the_first_and_reported() {
        let first = PolicySet {
            policies: policies(&split("s", "web", &[("web-v1", 1)], None)),
            problems: vec![],
        };
        let second = PolicySet {
            policies: policies(&split("s", "web", &[("web-v2", 1)], None)),
            problems: vec![],
        };
        let view = PolicyView::build(&[("one".into(), first), ("two".into(), second)]);
        let d = view.destination(&ServiceKey::new("demo", "web"));
        assert_eq!(d.split.unwrap().backends[0].service, "web-v1");
        assert_eq!(view.problems.len(), 1);
        assert_eq!(view.problems[0].location, "two");
    }

    #[test]
    fn the_diff_of_two_views_names_only_the_roots_and_workloads_that_changed() {
        let target = |name: &str, dest: &str| {
            format!(
                "---\napiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata: {{ name: {name}, namespace: demo }}\nspec:\n  destination: {{ kind: ServiceAccount, name: {dest}, namespace: demo }}\n  sources:\n  - {{ kind: ServiceAccount, name: client, namespace: demo }}\n  rules:\n  - {{ kind: TCPRoute, name: p }}\n"
            )
        };
        let route = |port: u16| {
            format!(
                "---\napiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata: {{ name: p, namespace: demo }}\nspec:\n  matches:\n    ports: [{port}]\n"
            )
        };
        let old = view(
            &[
                split("web", "web", &[("web-v1", 1), ("web-v2", 1)], None),
                split("api", "api", &[("api-v1", 1)], None),
                target("to-web", "web"),
                target("to-api", "api"),
                route(8080),
            ]
            .concat(),
        );
        let new = view(
            &[
                split("web", "web", &[("web-v1", 1), ("web-v2", 3)], None),
                split("api", "api", &[("api-v1", 1)], None),
                split("db", "db", &[("db-v1", 1)], None),
                target("to-web", "web"),
                target("to-api", "api"),
                target("to-api-2", "api"),
                route(8080),
            ]
            .concat(),
        );
        let roots = new.changed_roots(&old);
        let key = |n: &str| ServiceKey::new("demo", n);
        assert_eq!(roots, HashSet::from([key("web"), key("db")]));
        assert_eq!(
            new.changed_workloads(&old),
            Some(HashSet::from([key("api")]))
        );
        assert!(new.changed_roots(&new).is_empty());
        assert_eq!(new.changed_workloads(&new), Some(HashSet::new()));

        // A route change may concern any target.
        let before = view(&(target("to-web", "web") + &route(8080)));
        let after = view(&(target("to-web", "web") + &route(9090)));
        assert_eq!(after.changed_workloads(&before), None);
    }
}
