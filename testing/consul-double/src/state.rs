//! The catalog the double keeps: nodes, service instances and checks, with Consul's indexes.
//!
//! Every write takes the next Raft index. Like Consul, each service name has its own index (the
//! last write that touched one of its instances, their checks or their nodes), and the
//! `/v1/catalog/services` list has the index of the last service write. Queries for a service that
//! does not exist report the index of the last time any service lost its last instance (Consul's
//! extinction index; before the first one, the catalog's latest index), so a deletion still moves
//! the index forward and unrelated registrations do not wake such queries.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::wire::{
    CheckDefinition, CheckOut, DeregisterRequest, NodeOut, RegisterRequest, ServiceEntry,
    ServiceOut,
};

/// The namespace Consul uses when a request names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Check statuses Consul accepts in a registration.
pub const VALID_STATUSES: [&str; 3] = ["passing", "warning", "critical"];

/// A write Consul would refuse, with Consul's wording.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WriteError(pub String);

/// A check's namespace: its own, else the registration's, else its service's (Enterprise checks
/// inherit the namespace of the request that registers them).
fn check_namespace(
    check: &CheckDefinition,
    req: &RegisterRequest,
    service_ns: Option<&str>,
) -> String {
    [
        check.namespace.as_str(),
        req.namespace.as_str(),
        service_ns.unwrap_or(""),
    ]
    .into_iter()
    .find(|ns| !ns.is_empty())
    .map_or_else(|| DEFAULT_NAMESPACE.to_owned(), str::to_owned)
}

/// `ns`, or Consul's `default` when empty.
pub(crate) fn ns_or_default(ns: &str) -> String {
    if ns.is_empty() {
        DEFAULT_NAMESPACE.to_owned()
    } else {
        ns.to_owned()
    }
}

/// (node, namespace, service ID)
type InstanceKey = (String, String, String);
/// (namespace, service name)
type NameKey = (String, String);

#[derive(Debug, Default)]
pub struct State {
    pub datacenter: String,
    raft_index: u64,
    nodes: BTreeMap<String, NodeOut>,
    services: BTreeMap<InstanceKey, ServiceOut>,
    /// (node, check ID)
    checks: BTreeMap<(String, String), CheckOut>,
    service_index: HashMap<NameKey, u64>,
    services_table_index: u64,
    /// The index at which some service name last lost its last instance (Consul's
    /// "service_last_extinction"); `None` until that first happens.
    extinction_index: Option<u64>,
}

impl State {
    pub fn new(datacenter: &str) -> Self {
        Self {
            datacenter: datacenter.to_owned(),
            ..Self::default()
        }
    }

    fn next_index(&mut self) -> u64 {
        self.raft_index += 1;
        self.raft_index
    }

    fn touch(&mut self, ns: &str, name: &str, index: u64) {
        self.service_index
            .insert((ns.to_owned(), name.to_owned()), index);
    }

    fn names_on_node(&self, node: &str) -> BTreeSet<NameKey> {
        self.services
            .range((node.to_owned(), String::new(), String::new())..)
            .take_while(|((n, _, _), _)| n == node)
            .map(|((_, ns, _), s)| (ns.clone(), s.service.clone()))
            .collect()
    }

    /// `PUT /v1/catalog/register`: upserts the node, then the service, then the checks.
    pub fn register(&mut self, req: &RegisterRequest) -> Result<(), WriteError> {
        if req.node.is_empty() {
            return Err(WriteError("Must provide node".into()));
        }
        if req.address.is_empty() && !req.skip_node_update {
            return Err(WriteError(
                "Must provide address if SkipNodeUpdate is not set".into(),
            ));
        }
        let service_ns = req.service.as_ref().map(|s| {
            ns_or_default(if s.namespace.is_empty() {
                &req.namespace
            } else {
                &s.namespace
            })
        });
        if let Some(svc) = &req.service
            && svc.service.is_empty()
        {
            return Err(WriteError("Must provide service name".into()));
        }
        let checks: Vec<&CheckDefinition> = req.check.iter().chain(req.checks.iter()).collect();
        for check in &checks {
            if !check.status.is_empty() && !VALID_STATUSES.contains(&check.status.as_str()) {
                return Err(WriteError(format!(
                    "Invalid check status: {:?}",
                    check.status
                )));
            }
            if check.check_id.is_empty() && check.name.is_empty() {
                return Err(WriteError("Must provide a check ID or name".into()));
            }
            if !check.service_id.is_empty() {
                let ns = check_namespace(check, req, service_ns.as_deref());
                let registered_now = req.service.as_ref().is_some_and(|s| {
                    let id = if s.id.is_empty() { &s.service } else { &s.id };
                    *id == check.service_id && service_ns.as_deref() == Some(ns.as_str())
                });
                let known = self.services.contains_key(&(
                    req.node.clone(),
                    ns.clone(),
                    check.service_id.clone(),
                ));
                if !registered_now && !known {
                    return Err(WriteError(format!(
                        "Unknown service ID '{}' for check '{}'",
                        check.service_id, check.check_id
                    )));
                }
            }
        }

        let index = self.next_index();
        let service_ns_for_checks = service_ns.clone();
        if !req.skip_node_update || !self.nodes.contains_key(&req.node) {
            let create_index = self.nodes.get(&req.node).map_or(index, |n| n.create_index);
            self.nodes.insert(
                req.node.clone(),
                NodeOut {
                    id: req.id.clone(),
                    node: req.node.clone(),
                    address: req.address.clone(),
                    datacenter: self.datacenter.clone(),
                    tagged_addresses: req.tagged_addresses.clone(),
                    meta: req.node_meta.clone(),
                    create_index,
                    modify_index: index,
                },
            );
            // A node's address and meta are part of every health result of its services.
            for (ns, name) in self.names_on_node(&req.node) {
                self.touch(&ns, &name, index);
            }
        }
        if let (Some(svc), Some(ns)) = (&req.service, service_ns) {
            let id = if svc.id.is_empty() {
                svc.service.clone()
            } else {
                svc.id.clone()
            };
            let key = (req.node.clone(), ns.clone(), id.clone());
            let previous = self.services.get(&key);
            let create_index = previous.map_or(index, |s| s.create_index);
            let renamed_from = previous
                .filter(|old| old.service != svc.service)
                .map(|old| old.service.clone());
            self.services.insert(
                key,
                ServiceOut {
                    id,
                    service: svc.service.clone(),
                    tags: svc.tags.clone(),
                    address: svc.address.clone(),
                    tagged_addresses: svc.tagged_addresses.clone(),
                    meta: svc.meta.clone(),
                    port: svc.port,
                    weights: svc.weights.unwrap_or_default(),
                    enable_tag_override: svc.enable_tag_override,
                    namespace: ns.clone(),
                    create_index,
                    modify_index: index,
                },
            );
            self.touch(&ns, &svc.service, index);
            self.services_table_index = index;
            if let Some(old_name) = renamed_from {
                self.touch(&ns, &old_name, index);
                self.forget_if_empty(&ns, &old_name);
            }
        }
        for check in checks {
            let ns = check_namespace(check, req, service_ns_for_checks.as_deref());
            self.upsert_check(&req.node, check, &ns, index);
        }
        Ok(())
    }

    fn upsert_check(&mut self, node: &str, def: &CheckDefinition, ns: &str, index: u64) {
        let ns = ns.to_owned();
        let check_id = if def.check_id.is_empty() {
            def.name.clone()
        } else {
            def.check_id.clone()
        };
        let status = if def.status.is_empty() {
            "critical".to_owned()
        } else {
            def.status.clone()
        };
        let (service_name, service_tags) = if def.service_id.is_empty() {
            (String::new(), Vec::new())
        } else {
            let svc = &self.services[&(node.to_owned(), ns.clone(), def.service_id.clone())];
            (svc.service.clone(), svc.tags.clone())
        };
        let key = (node.to_owned(), check_id.clone());
        let create_index = self.checks.get(&key).map_or(index, |c| c.create_index);
        self.checks.insert(
            key,
            CheckOut {
                node: node.to_owned(),
                check_id,
                name: def.name.clone(),
                status,
                notes: def.notes.clone(),
                output: def.output.clone(),
                service_id: def.service_id.clone(),
                service_name: service_name.clone(),
                service_tags,
                namespace: ns.clone(),
                create_index,
                modify_index: index,
            },
        );
        self.touch_for_check(node, &ns, &service_name, index);
    }

    fn touch_for_check(&mut self, node: &str, ns: &str, service_name: &str, index: u64) {
        if service_name.is_empty() {
            // A node check is part of the health of every service on the node.
            for (ns, name) in self.names_on_node(node) {
                self.touch(&ns, &name, index);
            }
        } else {
            self.touch(ns, service_name, index);
        }
    }

    /// Changes one check's status (what a check run would do on a real agent).
    pub fn set_check_status(
        &mut self,
        node: &str,
        check_id: &str,
        status: &str,
    ) -> Result<(), WriteError> {
        self.update_check(node, check_id, status, None)
    }

    /// Sets one check's status, and its output when given (a check run's result).
    pub fn update_check(
        &mut self,
        node: &str,
        check_id: &str,
        status: &str,
        output: Option<&str>,
    ) -> Result<(), WriteError> {
        if !VALID_STATUSES.contains(&status) {
            return Err(WriteError(format!("Invalid check status: {status:?}")));
        }
        let key = (node.to_owned(), check_id.to_owned());
        if !self.checks.contains_key(&key) {
            return Err(WriteError(format!(
                "Unknown check '{check_id}' on node '{node}'"
            )));
        }
        let index = self.next_index();
        let check = self.checks.get_mut(&key).expect("checked above");
        check.status = status.to_owned();
        if let Some(output) = output {
            check.output = output.to_owned();
        }
        check.modify_index = index;
        let (ns, name) = (check.namespace.clone(), check.service_name.clone());
        self.touch_for_check(node, &ns, &name, index);
        Ok(())
    }

    /// `PUT /v1/catalog/deregister`: a check, a service instance (with its checks) or a whole node.
    pub fn deregister(&mut self, req: &DeregisterRequest) -> Result<(), WriteError> {
        if req.node.is_empty() {
            return Err(WriteError("Must provide node".into()));
        }
        let index = self.next_index();
        let ns = ns_or_default(&req.namespace);
        if !req.service_id.is_empty() {
            let key = (req.node.clone(), ns.clone(), req.service_id.clone());
            if let Some(svc) = self.services.remove(&key) {
                self.checks.retain(|(n, _), c| {
                    !(n == &req.node && c.service_id == req.service_id && c.namespace == ns)
                });
                self.touch(&ns, &svc.service, index);
                self.services_table_index = index;
                self.forget_if_empty(&ns, &svc.service);
            }
        } else if !req.check_id.is_empty() {
            if let Some(check) = self
                .checks
                .remove(&(req.node.clone(), req.check_id.clone()))
            {
                self.touch_for_check(&req.node, &check.namespace, &check.service_name, index);
            }
        } else if self.nodes.remove(&req.node).is_some() {
            let names = self.names_on_node(&req.node);
            self.services.retain(|(n, _, _), _| n != &req.node);
            self.checks.retain(|(n, _), _| n != &req.node);
            for (ns, name) in names {
                self.touch(&ns, &name, index);
                self.forget_if_empty(&ns, &name);
            }
            self.services_table_index = index;
        }
        Ok(())
    }

    /// Drops the per-name index of a name with no instance left: from then on its queries report
    /// the services-table index, which is at least as high.
    fn forget_if_empty(&mut self, ns: &str, name: &str) {
        let live = self
            .services
            .iter()
            .any(|((_, svc_ns, _), s)| svc_ns == ns && s.service == name);
        if !live {
            self.service_index.remove(&(ns.to_owned(), name.to_owned()));
            self.extinction_index = Some(self.raft_index);
        }
    }

    /// `GET /v1/health/service/:service`: every instance with its node and all its checks (node
    /// checks first), and the index of that service.
    pub fn health_service(
        &self,
        ns: &str,
        name: &str,
        passing_only: bool,
        tags: &[String],
    ) -> (Vec<ServiceEntry>, u64) {
        let ns = ns_or_default(ns);
        let mut out = Vec::new();
        for ((node_name, svc_ns, _), svc) in &self.services {
            if *svc_ns != ns || svc.service != name {
                continue;
            }
            if !tags.iter().all(|t| svc.tags.contains(t)) {
                continue;
            }
            let Some(node) = self.nodes.get(node_name) else {
                continue;
            };
            let mut checks: Vec<CheckOut> = self
                .checks
                .range((node_name.clone(), String::new())..)
                .take_while(|((n, _), _)| n == node_name)
                .map(|(_, c)| c)
                .filter(|c| c.service_id.is_empty())
                .cloned()
                .collect();
            checks.extend(
                self.checks
                    .range((node_name.clone(), String::new())..)
                    .take_while(|((n, _), _)| n == node_name)
                    .map(|(_, c)| c)
                    .filter(|c| c.service_id == svc.id && c.namespace == ns)
                    .cloned(),
            );
            if passing_only && checks.iter().any(|c| c.status != "passing") {
                continue;
            }
            out.push(ServiceEntry {
                node: node.clone(),
                service: svc.clone(),
                checks,
            });
        }
        let index = self
            .service_index
            .get(&(ns, name.to_owned()))
            .copied()
            // Consul: a missing service reports the last extinction index (so a deletion moves it
            // forward, and unrelated registrations do not wake it), else the catalog's max index.
            .unwrap_or(self.extinction_index.unwrap_or(self.raft_index));
        (out, index)
    }

    /// `GET /v1/catalog/services`: every service name in `ns` with the union of its tags.
    pub fn catalog_services(&self, ns: &str) -> (BTreeMap<String, Vec<String>>, u64) {
        let ns = ns_or_default(ns);
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for ((_, svc_ns, _), svc) in &self.services {
            if *svc_ns == ns {
                out.entry(svc.service.clone())
                    .or_default()
                    .extend(svc.tags.iter().cloned());
            }
        }
        let out = out
            .into_iter()
            .map(|(k, v)| (k, v.into_iter().collect()))
            .collect();
        (out, self.services_table_index)
    }

    /// Forces every index down to at most `to`, as a restore of an older Raft snapshot does.
    pub fn reset_index(&mut self, to: u64) {
        self.raft_index = to;
        self.services_table_index = self.services_table_index.min(to);
        self.extinction_index = self.extinction_index.map(|i| i.min(to));
        for v in self.service_index.values_mut() {
            *v = (*v).min(to);
        }
        for n in self.nodes.values_mut() {
            n.create_index = n.create_index.min(to);
            n.modify_index = n.modify_index.min(to);
        }
        for s in self.services.values_mut() {
            s.create_index = s.create_index.min(to);
            s.modify_index = s.modify_index.min(to);
        }
        for c in self.checks.values_mut() {
            c.create_index = c.create_index.min(to);
            c.modify_index = c.modify_index.min(to);
        }
    }

    pub fn has_node(&self, node: &str) -> bool {
        self.nodes.contains_key(node)
    }

    pub fn has_service(&self, node: &str, ns: &str, service_id: &str) -> bool {
        self.services
            .contains_key(&(node.to_owned(), ns_or_default(ns), service_id.to_owned()))
    }

    /// The IDs of the checks of one service instance.
    pub fn service_check_ids(&self, node: &str, ns: &str, service_id: &str) -> Vec<String> {
        let ns = ns_or_default(ns);
        self.checks
            .range((node.to_owned(), String::new())..)
            .take_while(|((n, _), _)| n == node)
            .filter(|(_, c)| c.service_id == service_id && c.namespace == ns)
            .map(|((_, id), _)| id.clone())
            .collect()
    }

    pub fn check(&self, node: &str, check_id: &str) -> Option<&CheckOut> {
        self.checks.get(&(node.to_owned(), check_id.to_owned()))
    }

    pub fn instance_count(&self) -> usize {
        self.services.len()
    }
}
