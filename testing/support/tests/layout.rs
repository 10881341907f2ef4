//! The workspace's dependency rules (README, "Layout"), checked on the resolved graph that
//! `cargo metadata` prints, so a change that breaks a seam fails the tests instead of waiting for
//! a reviewer:
//!
//! - no production crate has a normal (non-dev) dependency on test support (`testing/`);
//! - the control plane never links the data plane (`trellis-proxy`);
//! - the controller's core and its gRPC API build without a Kubernetes client (`kube`,
//!   `kube-client`, `kube-runtime`); `kube-core` (types only, through the SMI CRD types) is fine;
//! - the proxy links neither the controller, the adapters, `smi` nor any `kube` crate;
//! - `trellis-cli` built with `--no-default-features` (no `kubernetes` feature) links no
//!   Kubernetes client and none of our Kubernetes crates (README, "Building without
//!   Kubernetes"). `cargo metadata --no-default-features` resolves every member without its
//!   default features, which for trellis-cli's closure is what `cargo build -p trellis-cli
//!   --no-default-features` builds (trellis-controller's `kubernetes` feature is only ever turned
//!   on by trellis-cli's).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// The workspace as cargo resolves it: package id -> (name, manifest path), and the normal
/// (non-dev, non-build) dependency edges between package ids.
struct Graph {
    names: BTreeMap<String, String>,
    /// The features each package is resolved with.
    features: BTreeMap<String, Vec<String>>,
    manifests: BTreeMap<String, String>,
    normal: BTreeMap<String, Vec<String>>,
    members: Vec<String>,
}

fn graph() -> Graph {
    graph_with(&[])
}

/// The graph with extra `cargo metadata` flags (feature selection).
fn graph_with(flags: &[&str]) -> Graph {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .args(flags)
        .current_dir(&root)
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: Value = serde_json::from_slice(&output.stdout).expect("metadata is JSON");
    let mut names = BTreeMap::new();
    let mut manifests = BTreeMap::new();
    for package in metadata["packages"].as_array().unwrap() {
        let id = package["id"].as_str().unwrap().to_owned();
        names.insert(id.clone(), package["name"].as_str().unwrap().to_owned());
        manifests.insert(id, package["manifest_path"].as_str().unwrap().to_owned());
    }
    let mut normal = BTreeMap::new();
    let mut features = BTreeMap::new();
    for node in metadata["resolve"]["nodes"].as_array().unwrap() {
        features.insert(
            node["id"].as_str().unwrap().to_owned(),
            node["features"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap().to_owned())
                .collect(),
        );
        let deps = node["deps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|dep| {
                dep["dep_kinds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|kind| kind["kind"].is_null())
            })
            .map(|dep| dep["pkg"].as_str().unwrap().to_owned())
            .collect();
        normal.insert(node["id"].as_str().unwrap().to_owned(), deps);
    }
    let members = metadata["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap().to_owned())
        .collect();
    Graph {
        names,
        features,
        manifests,
        normal,
        members,
    }
}

impl Graph {
    fn id(&self, name: &str) -> String {
        self.members
            .iter()
            .find(|id| self.names[*id] == name)
            .unwrap_or_else(|| panic!("{name} is a workspace member"))
            .clone()
    }

    /// Every package `name` links, directly or not, through normal dependencies.
    fn closure(&self, name: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![self.id(name)];
        while let Some(id) = stack.pop() {
            for dep in &self.normal[&id] {
                if seen.insert(dep.clone()) {
                    stack.push(dep.clone());
                }
            }
        }
        seen.into_iter().map(|id| self.names[&id].clone()).collect()
    }

    fn features(&self, name: &str) -> &[String] {
        &self.features[&self.id(name)]
    }

    fn is_test_support(&self, id: &str) -> bool {
        self.manifests[id].contains("/testing/")
    }

    fn production_members(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|id| !self.is_test_support(id))
            .map(|id| self.names[id].clone())
            .collect()
    }

    fn test_support(&self) -> BTreeSet<String> {
        self.members
            .iter()
            .filter(|id| self.is_test_support(id))
            .map(|id| self.names[id].clone())
            .collect()
    }
}

fn forbidden(graph: &Graph, crate_name: &str, banned: &[&str]) -> Vec<String> {
    let linked = graph.closure(crate_name);
    banned
        .iter()
        .filter(|b| linked.contains(**b))
        .map(|b| format!("{crate_name} links {b}"))
        .collect()
}

#[test]
fn the_graph_has_the_crates_the_rules_name() {
    let graph = graph();
    let support = graph.test_support();
    for name in [
        "trellis-kube-fake",
        "trellis-consul-double",
        "trellis-discovery-suite",
        "trellis-conformance",
        "trellis-testing",
    ] {
        assert!(support.contains(name), "{name} lives under testing/");
    }
    // The rules below would pass vacuously if the crates they name were gone or renamed.
    for name in [
        "trellis-cli",
        "trellis-controller",
        "trellis-controller-core",
        "trellis-controller-grpc",
        "trellis-controller-kubernetes",
        "trellis-proxy",
    ] {
        graph.id(name);
    }
    // And the closure really follows edges: the runtime links the core and kube.
    let runtime = graph.closure("trellis-controller");
    assert!(runtime.contains("trellis-controller-core") && runtime.contains("kube"));
}

#[test]
fn production_crates_never_link_test_support() {
    let graph = graph();
    let support = graph.test_support();
    let banned: Vec<&str> = support.iter().map(String::as_str).collect();
    let mut violations = Vec::new();
    for name in graph.production_members() {
        violations.extend(forbidden(&graph, &name, &banned));
    }
    assert!(violations.is_empty(), "{violations:#?}");
}

#[test]
fn the_control_plane_never_links_the_data_plane() {
    let graph = graph();
    let mut violations = Vec::new();
    for name in [
        "trellis-controller",
        "trellis-controller-core",
        "trellis-controller-grpc",
        "trellis-controller-kubernetes",
    ] {
        violations.extend(forbidden(&graph, name, &["trellis-proxy"]));
    }
    assert!(violations.is_empty(), "{violations:#?}");
}

#[test]
fn the_core_and_the_grpc_api_build_without_a_kubernetes_client() {
    let graph = graph();
    let mut violations = Vec::new();
    for name in ["trellis-controller-core", "trellis-controller-grpc"] {
        violations.extend(forbidden(
            &graph,
            name,
            &[
                "kube",
                "kube-client",
                "kube-runtime",
                "trellis-controller-kubernetes",
            ],
        ));
    }
    assert!(violations.is_empty(), "{violations:#?}");
}

#[test]
fn the_proxy_links_no_control_plane_code() {
    let graph = graph();
    let violations = forbidden(
        &graph,
        "trellis-proxy",
        &[
            "trellis-smi",
            "trellis-discovery",
            "trellis-controller",
            "trellis-controller-core",
            "kube",
            "kube-core",
        ],
    );
    assert!(violations.is_empty(), "{violations:#?}");
}

/// What a Kubernetes-less `trellis` must not link.
const KUBERNETES: &[&str] = &[
    "kube",
    "kube-client",
    "kube-runtime",
    "trellis-controller-kubernetes",
    "trellis-adapter-kubernetes",
];

#[test]
fn trellis_cli_without_default_features_links_no_kubernetes_client() {
    let graph = graph_with(&["--no-default-features"]);
    // The rule would pass vacuously if the flag were not applied to trellis-cli and the runtime.
    for name in ["trellis-cli", "trellis-controller"] {
        assert!(
            !graph.features(name).iter().any(|f| f == "kubernetes"),
            "{name} is resolved with {:?}",
            graph.features(name)
        );
    }
    let violations = forbidden(&graph, "trellis-cli", KUBERNETES);
    assert!(violations.is_empty(), "{violations:#?}");
    // The Kubernetes-free build still has the controller and the other platforms.
    let linked = graph.closure("trellis-cli");
    for needed in [
        "trellis-controller",
        "trellis-adapter-consul",
        "trellis-adapter-cloudmap",
        "trellis-adapter-file",
    ] {
        assert!(linked.contains(needed), "trellis-cli links {needed}");
    }
}

#[test]
fn trellis_cli_with_default_features_links_kubernetes() {
    // The other side of the rule above: the feature is what brings the client in.
    let graph = graph();
    assert!(
        graph
            .features("trellis-cli")
            .iter()
            .any(|f| f == "kubernetes"),
        "kubernetes is a default feature of trellis-cli"
    );
    let linked = graph.closure("trellis-cli");
    for name in KUBERNETES {
        assert!(
            linked.contains(*name),
            "trellis-cli links {name} by default"
        );
    }
}
