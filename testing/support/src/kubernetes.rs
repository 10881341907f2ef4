//! The fake Kubernetes API server as the workspace's tests and benchmarks use it: every SMI kind
//! registered at its stored version, a `kube::Client` (or config) of it, and a kubeconfig naming it for a
//! child process (`trellis controller --platform kubernetes`).
//!
//! The SMI resource types come from the CRDs `trellis-smi` generates, so a new kind or a new
//! stored version reaches every test without a hand-kept table. They are registered here rather
//! than in `trellis-kube-fake` because the fake must stay free of SMI: it serves any CRD.

use std::path::Path;
use std::sync::OnceLock;

use trellis_kube_fake::{FakeApiServer, ResourceType};
use trellis_smi::crd::GeneratedCrd;
use trellis_smi::model::Kind;

/// The resource type of `crd` at its stored version.
///
/// Only the stored version: the fake keeps each (group, version, plural) as its own collection
/// and converts nothing, so serving older versions too would show clients separate, empty
/// collections where a real API server shows the same objects converted.
fn stored_type(generated: &GeneratedCrd) -> ResourceType {
    let spec = &generated.crd.spec;
    let stored = spec
        .versions
        .iter()
        .find(|v| v.storage)
        .unwrap_or_else(|| panic!("the {} CRD has a stored version", generated.kind));
    ResourceType::new(
        &spec.group,
        &stored.name,
        &spec.names.plural,
        &spec.names.kind,
        spec.scope == "Namespaced",
    )
}

/// Every SMI kind (and Trellis's TrafficPolicy and ExternalService: every kind the policy source
/// watches) with its resource type, in [`Kind::ALL`] order; generated once because CRD generation
/// parses the checked-in schemas.
fn table() -> &'static [(Kind, ResourceType)] {
    static TABLE: OnceLock<Vec<(Kind, ResourceType)>> = OnceLock::new();
    TABLE.get_or_init(|| {
        trellis_smi::crd::generate()
            .iter()
            .map(|generated| (generated.kind, stored_type(generated)))
            .collect()
    })
}

/// The resource types of every SMI kind at its stored version (what a cluster with the
/// generated CRDs installed serves as the preferred version).
pub fn smi_types() -> Vec<ResourceType> {
    table().iter().map(|(_, t)| t.clone()).collect()
}

/// The resource type of one SMI kind at its stored version.
pub fn smi_type(kind: Kind) -> ResourceType {
    table()
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, t)| t.clone())
        .unwrap_or_else(|| panic!("trellis-smi generates no CRD for {kind}"))
}

/// The TrafficSplit resource type at its stored version.
pub fn split_type() -> ResourceType {
    smi_type(Kind::TrafficSplit)
}

/// Registers every SMI kind on `server` (for tests that start without the CRDs and install
/// them later; others use [`smi_api_server`]).
pub fn register_smi(server: &FakeApiServer) {
    for resource in smi_types() {
        server.register(resource);
    }
}

/// A fake API server with every SMI kind (and TrafficPolicy) registered at its stored version,
/// besides the core
/// kinds the fake serves by default (`trellis_kube_fake::builtin`: Services, Pods,
/// EndpointSlices, Leases, Events...). Panics if it cannot start: a test can do nothing without
/// it.
pub async fn smi_api_server() -> FakeApiServer {
    let server = FakeApiServer::start()
        .await
        .expect("starting the fake API server");
    register_smi(&server);
    server
}

/// A kube config of the fake API server (for what builds its own client, such as the
/// Kubernetes discovery adapter).
pub fn kube_config(server: &FakeApiServer) -> kube::Config {
    kube::Config::new(server.url().parse().expect("fake URL"))
}

/// A kube client of the fake API server.
pub fn kube_client(server: &FakeApiServer) -> kube::Client {
    kube::Client::try_from(kube_config(server)).expect("kube client")
}

/// A kubeconfig whose current context is the API server at `url`, with no credentials (the
/// fake asks for none).
pub fn kubeconfig_yaml(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: '{url}'}}}}]\n\
         users: [{{name: u, user: {{}}}}]\ncontexts: [{{name: c, context: {{cluster: fake, user: u}}}}]\n\
         current-context: c\n"
    )
}

/// Writes a kubeconfig naming `server` to `path`, for a child process (`KUBECONFIG=path`).
pub fn write_kubeconfig(server: &FakeApiServer, path: &Path) -> std::io::Result<()> {
    std::fs::write(path, kubeconfig_yaml(&server.url()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generated CRDs give what the hand-kept tables said before.
    #[test]
    fn every_smi_kind_at_its_stored_version() {
        let types: Vec<(String, String, String, String, bool)> = smi_types()
            .into_iter()
            .map(|t| (t.group, t.version, t.plural, t.kind, t.namespaced))
            .collect();
        let expected = [
            (
                "split.smi-spec.io",
                "v1alpha4",
                "trafficsplits",
                "TrafficSplit",
            ),
            (
                "access.smi-spec.io",
                "v1alpha3",
                "traffictargets",
                "TrafficTarget",
            ),
            (
                "specs.smi-spec.io",
                "v1alpha4",
                "httproutegroups",
                "HTTPRouteGroup",
            ),
            ("specs.smi-spec.io", "v1alpha4", "tcproutes", "TCPRoute"),
            ("specs.smi-spec.io", "v1alpha4", "udproutes", "UDPRoute"),
            (
                "policy.trellis.io",
                "v1alpha1",
                "trafficpolicies",
                "TrafficPolicy",
            ),
            (
                "policy.trellis.io",
                "v1alpha1",
                "externalservices",
                "ExternalService",
            ),
        ]
        .map(|(g, v, p, k)| (g.into(), v.into(), p.into(), k.into(), true));
        assert_eq!(types, expected);
        assert_eq!(split_type(), smi_type(Kind::TrafficSplit));
        assert_eq!(smi_type(Kind::TcpRoute).plural, "tcproutes");
    }

    #[test]
    fn the_kubeconfig_names_the_server() {
        let yaml = kubeconfig_yaml("http://127.0.0.1:1234");
        assert!(yaml.contains("server: 'http://127.0.0.1:1234'"), "{yaml}");
        assert!(yaml.ends_with("current-context: c\n"), "{yaml}");
    }
}
