//! What the Kubernetes policy tests that run a real index share (`mod support;`): the
//! Kubernetes discovery adapter on the fake API server, and waiting for an index status.

use std::time::Duration;

use trellis_adapter_kubernetes::KubernetesDiscovery;
use trellis_controller_core::index::{Index, Status};
use trellis_kube_fake::FakeApiServer;

/// The Kubernetes discovery adapter reading the fake API server.
pub fn discovery(server: &FakeApiServer) -> KubernetesDiscovery {
    KubernetesDiscovery::new(trellis_testing::kube_config(server), Default::default())
        .expect("the discovery adapter")
}

/// Waits (at most 10 s) for a status of `index` that is `wanted`, and returns it; else fails
/// with the problems the index has, which say why.
pub async fn wait_status(index: &Index, what: &str, wanted: impl Fn(&Status) -> bool) -> Status {
    let mut status = index.status();
    match tokio::time::timeout(Duration::from_secs(10), status.wait_for(|s| wanted(s))).await {
        Ok(Ok(s)) => (**s).clone(),
        _ => panic!(
            "no status with {what} within 10 s; problems: {:#?}",
            index.status().borrow().problems
        ),
    }
}
