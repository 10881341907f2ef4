//! The merged policy of every source, indexed the way the resolvers read it: splits per root
//! service (in precedence order), TrafficPolicies per target service (likewise), route groups
//! and TCP routes by name, access policies.
//!
//! Building a view also finds the problems that need no discovery: splits whose weights sum to
//! 0, several splits for one root, route groups referenced but missing, one resource held by
//! two sources, several TrafficPolicies for one service (the oldest by creationTimestamp, then
//! the name, is in force; the others are not applied), and a TrafficPolicy in force whose route
//! sections name an HTTPRouteGroup or a match that does not exist (not applied at all: a policy
//! applies as written or not, never in part). The view keeps the [`Origin`] of every resource in force (from its source's
//! `PolicySet::origins`), and every problem is located at the origin of the resource at fault;
//! a problem about two resources names the other one's origin in its message.
//!
//! Two views are diffed ([`PolicyView::changed_roots`], [`PolicyView::changed_workloads`]) so a
//! policy change recomputes only the destinations and inbound policies it touches: the diff is
//! linear in the policy, never in the number of destinations, streams or endpoints.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use trellis_discovery::ServiceKey;
use trellis_smi::model::{
    AccessPolicy, ExternalPort, ExternalService, HttpRouteGroup, Kind, ObjectMeta, Policy,
    PortRoute, ResourceId, TrafficPolicy, TrafficSplit, effective_namespace,
};

use super::external::{external_name, external_rid, is_mesh_name};

use crate::policy::{Origin, PolicyProblem, PolicySet};

/// `(namespace, name)` of a namespaced resource.
pub type Named = (String, String);

/// The ExternalServices declaring one `host:port`, each with its declaration of the port.
pub type Declared = Vec<(Arc<ExternalService>, ExternalPort)>;

/// The merged policy in force, indexed.
#[derive(Clone, Debug, Default)]
pub struct PolicyView {
    /// Splits per root service, the one in force first (oldest creationTimestamp, then name).
    pub splits: HashMap<ServiceKey, Vec<TrafficSplit>>,
    pub route_groups: HashMap<Named, HttpRouteGroup>,
    pub tcp_routes: HashMap<Named, PortRoute>,
    pub udp_routes: HashMap<Named, PortRoute>,
    pub access: Vec<AccessPolicy>,
    /// TrafficPolicies per target service, the one in force first (oldest creationTimestamp,
    /// then name), whether or not it can be applied.
    pub traffic: HashMap<ServiceKey, Vec<TrafficPolicy>>,
    /// The targets whose TrafficPolicy in force cannot be applied (a route section names a
    /// route group or match that does not exist; reported).
    pub traffic_broken: HashSet<ServiceKey>,
    /// ExternalServices by declared `host:port` (hosts the mesh reads as its own service names
    /// left out), with the declared port; several = conflicting declarations (reported), in
    /// namespace/name order. See `super::external`.
    pub externals: BTreeMap<(String, u16), Declared>,
    /// ExternalServices' fixed addresses on their ports: the host and port each stands for, per
    /// ExternalService listing it (several ExternalServices = a conflict, reported).
    pub external_addresses: BTreeMap<SocketAddr, Vec<(String, u16, Arc<ExternalService>)>>,
    /// Every resource in force, sorted by kind, namespace, name.
    pub policies: Vec<Policy>,
    /// Where every resource in force came from.
    pub origins: HashMap<ResourceId, Origin>,
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
    /// Where the split came from: the location of the problems resolving it finds (part of the
    /// comparison, so a split that only moved is located anew).
    pub origin: Option<Origin>,
    /// The TrafficPolicy applied to the destination, if one is in force and can be applied.
    pub traffic: Option<AppliedPolicy>,
}

/// A TrafficPolicy that applies to a destination, with what its route sections name.
#[derive(Clone, Debug, PartialEq)]
pub struct AppliedPolicy {
    pub policy: TrafficPolicy,
    /// The route group of each route section, in section order (all exist).
    pub groups: Vec<HttpRouteGroup>,
    /// Where the policy came from: the location of the problems resolving it finds.
    pub origin: Option<Origin>,
}

/// [`AppliedPolicy`] borrowed from a view.
type AppliedRef<'v> = (
    &'v TrafficPolicy,
    Vec<Option<&'v HttpRouteGroup>>,
    Option<&'v Origin>,
);

/// [`DestinationPolicy`] borrowed from a view: the split, its groups, its origin, the policy.
type DestinationRef<'v> = (
    Option<(
        &'v TrafficSplit,
        Vec<Option<&'v HttpRouteGroup>>,
        Option<&'v Origin>,
    )>,
    Option<AppliedRef<'v>>,
);

/// The location of a problem about a resource the view has no origin for (views built by hand).
const UNKNOWN_ORIGIN: &str = "policy";

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

/// The location of a problem about the resource `id`.
fn origin_of(origins: &HashMap<ResourceId, Origin>, id: &ResourceId) -> String {
    origins.get(id).map_or(UNKNOWN_ORIGIN, |o| &**o).to_owned()
}

/// The id of a split (how origins are keyed).
fn split_rid(split: &TrafficSplit) -> ResourceId {
    ResourceId::new(Kind::TrafficSplit.as_str(), &split.metadata)
}

/// The id of a TrafficPolicy.
pub(crate) fn policy_rid(policy: &TrafficPolicy) -> ResourceId {
    ResourceId::new(Kind::TrafficPolicy.as_str(), &policy.metadata)
}

/// `TrafficPolicy ns/name`, how problems name a policy.
pub(crate) fn policy_id(policy: &TrafficPolicy) -> String {
    policy_rid(policy).to_string()
}

/// The service a TrafficPolicy targets (in its namespace).
pub(crate) fn policy_target(policy: &TrafficPolicy) -> ServiceKey {
    ServiceKey::new(
        effective_namespace(&policy.metadata),
        &policy.target_ref.name,
    )
}

/// Oldest creationTimestamp first (undated ones, from files, after dated ones), then by name:
/// the precedence of splits for one root and of TrafficPolicies for one service.
fn by_age(a: &ObjectMeta, b: &ObjectMeta) -> std::cmp::Ordering {
    let age = |m: &ObjectMeta| (m.creation_timestamp.is_none(), m.creation_timestamp.clone());
    age(a).cmp(&age(b)).then_with(|| a.name.cmp(&b.name))
}

/// The id of a TrafficTarget.
pub(crate) fn target_rid(target: &AccessPolicy) -> ResourceId {
    ResourceId::new(Kind::TrafficTarget.as_str(), &target.metadata)
}

impl PolicyView {
    /// Where the resource `id` came from.
    pub fn origin(&self, id: &ResourceId) -> Option<&Origin> {
        self.origins.get(id)
    }

    /// [`PolicyView::origin`] as a problem's location (never empty).
    pub fn location(&self, id: &ResourceId) -> String {
        origin_of(&self.origins, id)
    }

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
        let mut by_id: BTreeMap<ResourceId, (&Policy, Origin)> = BTreeMap::new();
        for &(source, set) in sources {
            view.problems.extend(set.problems.iter().cloned());
            // One shared text for every resource of a source that gives no origin.
            let mut fallback: Option<Origin> = None;
            for policy in &set.policies {
                let id = policy.id();
                let origin = match set.origins.get(&id) {
                    Some(origin) => origin.clone(),
                    None => fallback.get_or_insert_with(|| Arc::from(source)).clone(),
                };
                if let Some((_, used)) = by_id.get(&id) {
                    view.problems.push(PolicyProblem {
                        resource: id.to_string(),
                        location: origin.to_string(),
                        message: format!(
                            "also held by an earlier policy source (at {used}); that version is used"
                        ),
                    });
                    continue;
                }
                by_id.insert(id, (policy, origin));
            }
        }
        view.policies.reserve(by_id.len());
        view.origins.reserve(by_id.len());
        for (id, (policy, origin)) in by_id {
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
                Policy::UdpRoute(route) => {
                    view.udp_routes.insert(named(policy), route.clone());
                }
                Policy::AccessPolicy(access) => view.access.push(access.clone()),
                Policy::TrafficPolicy(traffic) => {
                    view.traffic
                        .entry(policy_target(traffic))
                        .or_default()
                        .push(TrafficPolicy::clone(traffic));
                }
                Policy::ExternalService(external) => {
                    let external = Arc::new(ExternalService::clone(external));
                    // The first host the mesh does not claim stands for the fixed addresses.
                    if let Some(host) = external.hosts.iter().find(|h| !is_mesh_name(h)) {
                        let ips = external
                            .addresses
                            .iter()
                            .filter_map(|a| a.parse::<IpAddr>().ok());
                        for ip in ips {
                            for port in &external.ports {
                                view.external_addresses
                                    .entry(SocketAddr::new(ip, port.port))
                                    .or_default()
                                    .push((host.clone(), port.port, external.clone()));
                            }
                        }
                    }
                    for (i, host) in external.hosts.iter().enumerate() {
                        if is_mesh_name(host) {
                            view.problems.push(PolicyProblem {
                                resource: id.to_string(),
                                location: origin.to_string(),
                                message: format!(
                                    "spec.hosts[{i}]: {host} is a mesh service name (name.namespace): the mesh service wins, this host is not served as external"
                                ),
                            });
                            continue;
                        }
                        for port in &external.ports {
                            view.externals
                                .entry((host.clone(), port.port))
                                .or_default()
                                .push((external.clone(), port.clone()));
                        }
                    }
                }
            }
            view.policies.push(policy.clone());
            view.origins.insert(id, origin);
        }
        let mut split_problems = Vec::new();
        for (root, splits) in &mut view.splits {
            splits.sort_by(|a, b| by_age(&a.metadata, &b.metadata));
            if splits.len() > 1 {
                // Located at the split in force (the Event goes on it); the ignored ones are
                // named with where they are, since one of them is likely the one to delete.
                let others: Vec<String> = splits[1..]
                    .iter()
                    .map(|s| {
                        let at = origin_of(&view.origins, &split_rid(s));
                        format!("{} (at {at})", split_id(s))
                    })
                    .collect();
                split_problems.push(PolicyProblem {
                    resource: split_id(&splits[0]),
                    location: origin_of(&view.origins, &split_rid(&splits[0])),
                    message: format!(
                        "root {root}: several splits for one root: this one (oldest, then by name) is in force; ignored: {}",
                        others.join(", ")
                    ),
                });
            }
        }
        for splits in view.splits.values() {
            for split in splits {
                let zero = split.backends.iter().all(|b| b.weight.milli() == 0);
                let ns = effective_namespace(&split.metadata);
                let missing = split.matches.iter().filter(|group| {
                    !view
                        .route_groups
                        .contains_key(&(ns.to_owned(), group.name.clone()))
                });
                let mut missing = missing.peekable();
                if !zero && missing.peek().is_none() {
                    continue;
                }
                let location = origin_of(&view.origins, &split_rid(split));
                if zero {
                    split_problems.push(PolicyProblem {
                        resource: split_id(split),
                        location: location.clone(),
                        message: "weights sum to 0: the split is inactive and traffic goes to the root service".into(),
                    });
                }
                for group in missing {
                    split_problems.push(PolicyProblem {
                        resource: split_id(split),
                        location: location.clone(),
                        message: format!(
                            "HTTPRouteGroup {ns}/{} is referenced but missing: its requests go to the root service",
                            group.name
                        ),
                    });
                }
            }
        }
        split_problems.sort_by(|a, b| (&a.resource, &a.message).cmp(&(&b.resource, &b.message)));
        view.problems.extend(split_problems);
        let mut traffic_problems = Vec::new();
        for (target, policies) in &mut view.traffic {
            policies.sort_by(|a, b| by_age(&a.metadata, &b.metadata));
            let in_force = &policies[0];
            let in_force_at = origin_of(&view.origins, &policy_rid(in_force));
            // Each ignored policy is reported where it is: it is the one to fix or delete.
            for ignored in &policies[1..] {
                traffic_problems.push(PolicyProblem {
                    resource: policy_id(ignored),
                    location: origin_of(&view.origins, &policy_rid(ignored)),
                    message: format!(
                        "service {target}: several TrafficPolicies for one service: {} (at {in_force_at}) is in force (oldest, then by name); this one is not applied",
                        policy_id(in_force)
                    ),
                });
            }
            let ns = effective_namespace(&in_force.metadata);
            let mut broken = false;
            for (i, route) in in_force.routes.iter().enumerate() {
                let group = &route.http_route_group;
                let message = match view.route_groups.get(&(ns.to_owned(), group.clone())) {
                    None => format!(
                        "spec.routes[{i}].httpRouteGroup: HTTPRouteGroup {ns}/{group} does not exist"
                    ),
                    Some(found) => {
                        let unknown: Vec<&String> = route
                            .matches
                            .iter()
                            .flatten()
                            .filter(|name| !found.matches.iter().any(|m| &m.name == *name))
                            .collect();
                        if unknown.is_empty() {
                            continue;
                        }
                        format!(
                            "spec.routes[{i}].matches: HTTPRouteGroup {ns}/{group} has no match named {unknown:?}"
                        )
                    }
                };
                broken = true;
                traffic_problems.push(PolicyProblem {
                    resource: policy_id(in_force),
                    location: in_force_at.clone(),
                    message: format!("{message}: the policy is not applied"),
                });
            }
            if broken {
                view.traffic_broken.insert(target.clone());
            }
        }
        traffic_problems.sort_by(|a, b| (&a.resource, &a.message).cmp(&(&b.resource, &b.message)));
        view.problems.extend(traffic_problems);
        // Conflicting declarations of one host (on any ports: a host is one destination, whose
        // sources and ports come from one ExternalService), reported on each (`super::external`
        // says what is answered). By_id iterated in id order, so each list is in namespace/name
        // order.
        let mut by_host: BTreeMap<&str, Vec<&Arc<ExternalService>>> = BTreeMap::new();
        for ((host, _), declared) in &view.externals {
            let list = by_host.entry(host.as_str()).or_default();
            for (external, _) in declared {
                if !list.iter().any(|e| Arc::ptr_eq(e, external)) {
                    list.push(external);
                }
            }
        }
        let mut host_problems = Vec::new();
        for (host, declared) in by_host {
            if declared.len() < 2 {
                continue;
            }
            for external in &declared {
                let others: Vec<String> = declared
                    .iter()
                    .filter(|other| !Arc::ptr_eq(other, external))
                    .map(|other| {
                        let at = origin_of(&view.origins, &external_rid(other));
                        format!("ExternalService {} (at {at})", external_name(other))
                    })
                    .collect();
                host_problems.push(PolicyProblem {
                    resource: external_rid(external).to_string(),
                    location: origin_of(&view.origins, &external_rid(external)),
                    message: format!(
                        "{host} is also declared by {}: nobody may call it until one declaration is removed",
                        others.join(", ")
                    ),
                });
            }
        }
        view.problems.extend(host_problems);
        for (addr, listed) in &view.external_addresses {
            if listed.len() < 2 {
                continue;
            }
            for (_, _, external) in listed {
                let others: Vec<String> = listed
                    .iter()
                    .filter(|(_, _, other)| !Arc::ptr_eq(other, external))
                    .map(|(_, _, other)| {
                        let at = origin_of(&view.origins, &external_rid(other));
                        format!("ExternalService {} (at {at})", external_name(other))
                    })
                    .collect();
                view.problems.push(PolicyProblem {
                    resource: external_rid(external).to_string(),
                    location: origin_of(&view.origins, &external_rid(external)),
                    message: format!(
                        "spec.addresses: {addr} is also listed by {}: nobody may call it there until one is removed",
                        others.join(", ")
                    ),
                });
            }
        }
        view
    }

    /// The TrafficPolicy applied to `target`, if one is in force and can be applied.
    pub fn traffic_policy(&self, target: &ServiceKey) -> Option<&TrafficPolicy> {
        if self.traffic_broken.contains(target) {
            return None;
        }
        self.traffic.get(target)?.first()
    }

    /// The services TrafficPolicies target (applied or not): the controller watches them, to
    /// report a target that does not exist and to find the workloads of rate limits.
    pub fn traffic_targets(&self) -> impl Iterator<Item = &ServiceKey> {
        self.traffic.keys()
    }

    /// [`PolicyView::traffic_policy`] with its route groups and origin, borrowed.
    fn applied_ref(&self, target: &ServiceKey) -> Option<AppliedRef<'_>> {
        let policy = self.traffic_policy(target)?;
        let ns = effective_namespace(&policy.metadata);
        let groups = policy
            .routes
            .iter()
            .map(|r| {
                self.route_groups
                    .get(&(ns.to_owned(), r.http_route_group.clone()))
            })
            .collect();
        Some((policy, groups, self.origin(&policy_rid(policy))))
    }

    /// The roots whose [`DestinationPolicy`] differs between `old` and `self` (split in force or
    /// the route groups it names). Linear in the splits of both views.
    pub fn changed_roots(&self, old: &PolicyView) -> HashSet<ServiceKey> {
        self.splits
            .keys()
            .chain(old.splits.keys())
            .chain(self.traffic.keys())
            .chain(old.traffic.keys())
            .filter(|root| self.destination_ref(root) != old.destination_ref(root))
            .cloned()
            .collect()
    }

    /// The workloads (`namespace/name` of TrafficTarget destinations) whose inbound policy may
    /// differ between `old` and `self`; `None` = any of them (an HTTPRouteGroup, TCPRoute or
    /// UDPRoute changed: targets name routes, so every target may read it).
    pub fn changed_workloads(&self, old: &PolicyView) -> Option<HashSet<ServiceKey>> {
        // TrafficPolicies: their rate limits go to the workloads behind their targets, which only
        // discovery knows; any change may concern any workload of the namespace.
        if self.route_groups != old.route_groups
            || self.tcp_routes != old.tcp_routes
            || self.udp_routes != old.udp_routes
            || self.traffic != old.traffic
            || self.traffic_broken != old.traffic_broken
        {
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

    /// The TrafficTargets per destination workload, in view order, with their origins (where
    /// the problems of that workload's inbound policy are located).
    fn access_by_workload(&self) -> HashMap<ServiceKey, Vec<(&AccessPolicy, Option<&Origin>)>> {
        let mut out: HashMap<ServiceKey, Vec<_>> = HashMap::new();
        for target in &self.access {
            let ns = effective_namespace(&target.metadata);
            let dest_ns = target.destination.namespace.as_deref().unwrap_or(ns);
            out.entry(ServiceKey::new(dest_ns, &target.destination.name))
                .or_default()
                .push((target, self.origin(&target_rid(target))));
        }
        out
    }

    /// [`PolicyView::destination`] without copies, for comparisons.
    fn destination_ref(&self, root: &ServiceKey) -> DestinationRef<'_> {
        let split = self.splits.get(root).and_then(|s| s.first()).map(|split| {
            let ns = effective_namespace(&split.metadata);
            let groups = split
                .matches
                .iter()
                .map(|g| self.route_groups.get(&(ns.to_owned(), g.name.clone())))
                .collect();
            (split, groups, self.origin(&split_rid(split)))
        });
        (split, self.applied_ref(root))
    }

    /// What the profile of `root` depends on.
    pub fn destination(&self, root: &ServiceKey) -> DestinationPolicy {
        let traffic = self
            .applied_ref(root)
            .map(|(policy, groups, origin)| AppliedPolicy {
                policy: policy.clone(),
                groups: groups.into_iter().flatten().cloned().collect(),
                origin: origin.cloned(),
            });
        let Some(split) = self.splits.get(root).and_then(|s| s.first()) else {
            return DestinationPolicy {
                traffic,
                ..DestinationPolicy::default()
            };
        };
        let ns = effective_namespace(&split.metadata).to_owned();
        DestinationPolicy {
            traffic,
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
            origin: self.origin(&split_rid(split)).cloned(),
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

    /// The set of `yaml` read as `file`, every resource located at its document
    /// (`file:line`), as the files source gives it; it must load cleanly.
    pub(crate) fn located_set(file: &str, yaml: &str) -> PolicySet {
        let report = load_str(file, yaml);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        PolicySet {
            origins: report
                .resources
                .iter()
                .map(|r| (r.policy.id(), Origin::from(r.source.to_string())))
                .collect(),
            policies: report.resources.into_iter().map(|r| r.policy).collect(),
            problems: vec![],
        }
    }

    pub(crate) fn view(yaml: &str) -> PolicyView {
        PolicyView::build(&[("test".into(), located_set("test.yaml", yaml))])
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
        // Located at the split in force (test.yaml:10), naming the ignored ones where they are.
        assert_eq!(
            merged.problems,
            [PolicyProblem {
                resource: "TrafficSplit demo/c-old".into(),
                location: "test.yaml:10".into(),
                message: "root demo/web: several splits for one root: this one (oldest, then by name) is in force; ignored: TrafficSplit demo/b-new (at test.yaml:2), TrafficSplit demo/a-undated (at test.yaml:18)".into(),
            }]
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
    fn weights_summing_to_zero_and_missing_route_groups_are_reported_where_the_split_is() {
        // zero: lines 1-9 (its document starts on 2); routed: 10-19 (starts on 11); the group: 20-.
        let mut yaml = split("zero", "web", &[("web-v1", 0), ("web-v2", 0)], None);
        yaml.push_str(&split("routed", "api", &[("api-v2", 1)], None));
        yaml.push_str("  matches:\n  - {kind: HTTPRouteGroup, name: api-routes}\n");
        yaml.push_str("---\napiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\nmetadata: {name: api-routes, namespace: demo}\nspec:\n  matches:\n  - {name: all, pathRegex: '.*'}\n");
        let mut set = located_set("dir/splits.yaml", &yaml);
        // The group goes while the split stays (the files source keeps the last good split when
        // its new version names a group that is gone; a Kubernetes group can simply be deleted).
        set.policies
            .retain(|p| !matches!(p, Policy::HttpRouteGroup(_)));
        let view = PolicyView::build(&[("files:dir".into(), set)]);
        let lines: Vec<String> = view.problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "dir/splits.yaml:11: TrafficSplit demo/routed: HTTPRouteGroup demo/api-routes is referenced but missing: its requests go to the root service",
                "dir/splits.yaml:2: TrafficSplit demo/zero: weights sum to 0: the split is inactive and traffic goes to the root service",
            ]
        );
        let d = view.destination(&ServiceKey::new("demo", "api"));
        assert_eq!(d.groups, vec![("api-routes".to_string(), None)]);
        assert_eq!(d.origin.as_deref(), Some("dir/splits.yaml:11"));
    }

    #[test]
    fn a_resource_two_sources_hold_is_taken_from_the_first_and_reported_with_both_locations() {
        let first = located_set("one.yaml", &split("s", "web", &[("web-v1", 1)], None));
        let second = located_set("two.yaml", &split("s", "web", &[("web-v2", 1)], None));
        let view = PolicyView::build(&[("one".into(), first), ("two".into(), second)]);
        let d = view.destination(&ServiceKey::new("demo", "web"));
        assert_eq!(d.split.unwrap().backends[0].service, "web-v1");
        assert_eq!(
            view.problems,
            [PolicyProblem {
                resource: "TrafficSplit demo/s".into(),
                location: "two.yaml:2".into(),
                message:
                    "also held by an earlier policy source (at one.yaml:2); that version is used"
                        .into(),
            }]
        );

        // A source that gives no origins: its resources are located at the source's name.
        let bare = PolicySet {
            policies: policies(&split("s", "web", &[("web-v3", 1)], None)),
            ..PolicySet::default()
        };
        let view = PolicyView::build(&[
            (
                "one".into(),
                located_set("one.yaml", &split("s", "web", &[("web-v1", 1)], None)),
            ),
            ("bare".into(), bare),
        ]);
        assert_eq!(view.problems.len(), 1, "{:?}", view.problems);
        assert_eq!(view.problems[0].location, "bare");
    }

    pub(crate) fn traffic_policy(
        name: &str,
        target: &str,
        created: Option<&str>,
        spec: &str,
    ) -> String {
        let created = created
            .map(|c| format!(", creationTimestamp: \"{c}\""))
            .unwrap_or_default();
        format!(
            "---\napiVersion: policy.trellis.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}, namespace: demo{created}}}\nspec:\n  targetRef: {{name: {target}}}\n{spec}"
        )
    }

    #[test]
    fn several_traffic_policies_for_one_service_the_oldest_wins_and_the_others_are_reported() {
        let yaml = [
            traffic_policy(
                "b-new",
                "web",
                Some("2024-01-02T00:00:00Z"),
                "  timeouts: {request: 1s}\n",
            ),
            traffic_policy(
                "c-old",
                "web",
                Some("2024-01-01T00:00:00Z"),
                "  timeouts: {request: 2s}\n",
            ),
            traffic_policy("a-undated", "web", None, "  timeouts: {request: 3s}\n"),
        ]
        .concat();
        let merged = view(&yaml);
        let web = ServiceKey::new("demo", "web");
        let in_force = merged.traffic_policy(&web).unwrap();
        assert_eq!(in_force.metadata.name.as_deref(), Some("c-old"));
        let d = merged.destination(&web);
        assert_eq!(d.traffic.unwrap().origin.as_deref(), Some("test.yaml:9"));
        let lines: Vec<String> = merged.problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "test.yaml:16: TrafficPolicy demo/a-undated: service demo/web: several TrafficPolicies for one service: TrafficPolicy demo/c-old (at test.yaml:9) is in force (oldest, then by name); this one is not applied",
                "test.yaml:2: TrafficPolicy demo/b-new: service demo/web: several TrafficPolicies for one service: TrafficPolicy demo/c-old (at test.yaml:9) is in force (oldest, then by name); this one is not applied",
            ]
        );
    }

    #[test]
    fn a_traffic_policy_naming_a_missing_route_group_or_match_is_reported_and_not_applied() {
        let group = "---\napiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\nmetadata: {name: web-routes, namespace: demo}\nspec:\n  matches:\n  - {name: api, pathRegex: '/api'}\n";
        let sections = "  timeouts: {request: 1s}\n  routes:\n  - {httpRouteGroup: web-routes, matches: [api], timeouts: {request: 5s}}\n";
        let yaml = traffic_policy("p", "web", None, sections) + group;
        let web = ServiceKey::new("demo", "web");
        assert!(view(&yaml).traffic_policy(&web).is_some(), "sound: applied");

        // The group goes (deleted on Kubernetes; a files source keeps the last good policy).
        let mut set = located_set("dir/p.yaml", &yaml);
        set.policies
            .retain(|p| !matches!(p, Policy::HttpRouteGroup(_)));
        let gone = PolicyView::build(&[("files".into(), set)]);
        assert!(gone.traffic_policy(&web).is_none());
        assert!(gone.destination(&web).traffic.is_none());
        let lines: Vec<String> = gone.problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "dir/p.yaml:2: TrafficPolicy demo/p: spec.routes[0].httpRouteGroup: HTTPRouteGroup demo/web-routes does not exist: the policy is not applied"
            ]
        );

        // The group loses the match.
        let mut set = located_set("dir/p.yaml", &yaml);
        for policy in &mut set.policies {
            if let Policy::HttpRouteGroup(g) = policy {
                g.matches[0].name = "other".into();
            }
        }
        let renamed = PolicyView::build(&[("files".into(), set)]);
        assert!(renamed.traffic_policy(&web).is_none());
        assert_eq!(
            renamed.problems[0].message,
            "spec.routes[0].matches: HTTPRouteGroup demo/web-routes has no match named [\"api\"]: the policy is not applied"
        );
        // Either way the destination's profile changes (the policy left it).
        assert!(renamed.changed_roots(&view(&yaml)).contains(&web));
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
        // Additions at the end: every resource of `old` keeps its line (a resource that moved is
        // a change of its location, below).
        let new = view(
            &[
                split("web", "web", &[("web-v1", 1), ("web-v2", 3)], None),
                split("api", "api", &[("api-v1", 1)], None),
                target("to-web", "web"),
                target("to-api", "api"),
                route(8080),
                split("db", "db", &[("db-v1", 1)], None),
                target("to-api-2", "api"),
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

        // A split or a target that only moved (another file or line) is located anew.
        let moved = PolicyView::build(&[(
            "test".into(),
            located_set(
                "moved.yaml",
                &[
                    split("web", "web", &[("web-v1", 1), ("web-v2", 3)], None),
                    split("api", "api", &[("api-v1", 1)], None),
                    target("to-web", "web"),
                    target("to-api", "api"),
                    route(8080),
                    split("db", "db", &[("db-v1", 1)], None),
                    target("to-api-2", "api"),
                ]
                .concat(),
            ),
        )]);
        assert_eq!(
            moved.changed_roots(&new),
            HashSet::from([key("web"), key("api"), key("db")])
        );
        assert_eq!(
            moved.changed_workloads(&new),
            Some(HashSet::from([key("web"), key("api")]))
        );

        // A route change may concern any target.
        let before = view(&(target("to-web", "web") + &route(8080)));
        let after = view(&(target("to-web", "web") + &route(9090)));
        assert_eq!(after.changed_workloads(&before), None);
    }
}
