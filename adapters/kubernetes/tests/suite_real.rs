//! The shared behavioural suite against a real API server, when `TRELLIS_TEST_KUBECONFIG` names
//! a kubeconfig (skipped with the reason printed otherwise). Runs in its own namespace
//! `trellis-test-<pid>`, deleted at the end.

mod common;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams};
use trellis_discovery_suite::Scenario;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_against_a_real_api_server() {
    let Some(harness) = common::real_harness().await else {
        return;
    };
    for scenario in Scenario::ALL {
        println!("scenario {scenario:?}");
        trellis_discovery_suite::run(scenario, &harness).await;
    }
    let namespaces: Api<Namespace> = Api::all(harness.client.clone());
    let _ = namespaces
        .delete(&harness.namespace, &DeleteParams::default())
        .await;
}
