//! The registry of resource types the fake server knows, and the discovery documents
//! (`/api`, `/apis`, `/api/v1`, `/apis/<group>/<version>`) generated from it.

use serde_json::{Value, json};

/// One resource type: where it lives in the URL space and what its objects are called.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ResourceType {
    /// API group; empty for the core group (`/api/v1`).
    pub group: String,
    pub version: String,
    /// Plural name used in URLs, e.g. `endpointslices`.
    pub plural: String,
    pub kind: String,
    pub namespaced: bool,
}

impl ResourceType {
    pub fn new(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool) -> Self {
        Self {
            group: group.to_owned(),
            version: version.to_owned(),
            plural: plural.to_owned(),
            kind: kind.to_owned(),
            namespaced,
        }
    }

    /// The resource type of a k8s-openapi type (namespaced or not must be said: k8s-openapi's
    /// scope is a type, not a value).
    pub fn of<K: k8s_openapi::Resource>(namespaced: bool) -> Self {
        Self::new(
            K::GROUP,
            K::VERSION,
            K::URL_PATH_SEGMENT,
            K::KIND,
            namespaced,
        )
    }

    /// `v1` for the core group, else `group/version`: the `apiVersion` of its objects.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `group/version/plural` (core group: `/v1/plural`): the store's key for this type.
    pub(crate) fn id(&self) -> String {
        format!("{}/{}/{}", self.group, self.version, self.plural)
    }

    /// Whether this type's objects are cluster-scoped or namespaced is a fixed fact; a path with
    /// the wrong shape is a 404 on a real server too.
    pub(crate) fn matches(&self, group: &str, version: &str, plural: &str) -> bool {
        self.group == group && self.version == version && self.plural == plural
    }
}

/// The types registered by default: what the Kubernetes discovery adapter reads and writes, and
/// what the controller writes (Leases for leader election, Events in both API groups).
pub fn builtin() -> Vec<ResourceType> {
    use k8s_openapi::api::{
        apps::v1 as apps, coordination::v1 as coordination, core::v1 as core,
        discovery::v1 as discovery, events::v1 as events,
    };
    vec![
        ResourceType::of::<core::Namespace>(false),
        ResourceType::of::<core::Service>(true),
        ResourceType::of::<core::Pod>(true),
        ResourceType::of::<core::ConfigMap>(true),
        ResourceType::of::<core::ServiceAccount>(true),
        ResourceType::of::<discovery::EndpointSlice>(true),
        ResourceType::of::<apps::ReplicaSet>(true),
        ResourceType::of::<apps::Deployment>(true),
        ResourceType::of::<apps::StatefulSet>(true),
        ResourceType::of::<apps::DaemonSet>(true),
        ResourceType::of::<coordination::Lease>(true),
        ResourceType::of::<events::Event>(true),
        ResourceType::of::<core::Event>(true),
    ]
}

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "get",
    "list",
    "patch",
    "update",
    "watch",
    "deletecollection",
];

/// `GET /api`: the core group's versions.
pub(crate) fn core_versions() -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
    })
}

/// `GET /apis`: every named group and its versions (first registered version preferred).
pub(crate) fn group_list(types: &[ResourceType]) -> Value {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for t in types.iter().filter(|t| !t.group.is_empty()) {
        match groups.iter_mut().find(|(g, _)| *g == t.group) {
            Some((_, versions)) if !versions.contains(&t.version) => {
                versions.push(t.version.clone())
            }
            Some(_) => {}
            None => groups.push((t.group.clone(), vec![t.version.clone()])),
        }
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(name, versions)| {
            let gvs: Vec<Value> = versions
                .iter()
                .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
                .collect();
            json!({"name": name, "versions": gvs, "preferredVersion": gvs[0]})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `GET /api/v1` or `/apis/<group>/<version>`: the resources of one group version, `None` if
/// nothing is registered there.
pub(crate) fn resource_list(types: &[ResourceType], group: &str, version: &str) -> Option<Value> {
    let resources: Vec<Value> = types
        .iter()
        .filter(|t| t.group == group && t.version == version)
        .map(|t| {
            json!({
                "name": t.plural,
                "singularName": t.kind.to_ascii_lowercase(),
                "namespaced": t.namespaced,
                "kind": t.kind,
                "verbs": VERBS,
            })
        })
        .collect();
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}
