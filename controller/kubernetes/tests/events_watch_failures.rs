//! Watch failures of the Kubernetes policy source (API server unreachable, CRD missing) are
//! visible where people look: as problems in the index's status (`/api/v1/state`, `trellis
//! check`), with the time they started, and they clear when the watch works again.

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::wait_status;
use trellis_controller_core::index::{Index, IndexOptions, Status};
use trellis_controller_core::policy::PolicySource;
use trellis_controller_kubernetes::policy::KubernetesPolicySource;
use trellis_kube_fake::FakeApiServer;
use trellis_testing::{kube_client, register_smi, split_type};

fn index(server: &FakeApiServer) -> Index {
    let source: Arc<dyn PolicySource> = Arc::new(KubernetesPolicySource::new(kube_client(server)));
    let discovery = support::discovery(server);
    Index::start(vec![source], Arc::new(discovery), IndexOptions::default())
}

fn watch_problems(status: &Status) -> Vec<String> {
    status
        .problems
        .iter()
        .filter(|p| {
            // Tied to no object, and saying so: `kubernetes <Kind> watch`.
            p.location.starts_with("kubernetes ")
                && p.location.ends_with(" watch")
                && p.message.starts_with("watch failing since ")
        })
        .map(|p| format!("{}: {}: {}", p.location, p.resource, p.message))
        .collect()
}

#[tokio::test]
async fn an_unreachable_api_server_is_a_problem_until_it_answers_again() {
    let server = FakeApiServer::start().await.unwrap();
    register_smi(&server);
    server
        .store()
        .apply(
            &split_type(),
            json!({
                "apiVersion": "split.smi-spec.io/v1alpha4",
                "kind": "TrafficSplit",
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"service": "web", "backends": [{"service": "web-v1", "weight": 1}]},
            }),
        )
        .unwrap();
    let index = index(&server);
    wait_status(&index, "the split in force", |s| {
        s.policy_ready && s.policies.len() == 1
    })
    .await;
    assert!(watch_problems(&index.status().borrow()).is_empty());

    server.begin_outage();
    // One watch per kind: the five SMI kinds, Trellis's TrafficPolicy and ExternalService.
    let kinds = trellis_smi::model::Kind::ALL.len();
    let status = wait_status(&index, "watch failures", |s| {
        watch_problems(s).len() == kinds
    })
    .await;
    // The last policy stays in force, and the problem says so and since when.
    assert_eq!(status.policies.len(), 1);
    let problems = watch_problems(&status);
    assert!(
        problems.iter().any(|p| p
            .starts_with("kubernetes TrafficSplit watch: TrafficSplit (split.smi-spec.io/v1alpha4): watch failing since 20")
            && p.ends_with("; the last policy stays in force")),
        "{problems:#?}"
    );

    server.end_outage().await.unwrap();
    let status = wait_status(&index, "no watch failures", |s| {
        watch_problems(s).is_empty()
    })
    .await;
    assert_eq!(status.policies.len(), 1);
}

#[tokio::test]
async fn a_missing_crd_is_a_lasting_problem_of_that_kind_only() {
    let server = FakeApiServer::start().await.unwrap();
    server.register(split_type()); // only TrafficSplit is installed
    let index = index(&server);
    let status = wait_status(&index, "the missing kinds", |s| {
        s.policy_ready && watch_problems(s).len() == trellis_smi::model::Kind::ALL.len() - 1
    })
    .await;
    let problems = watch_problems(&status);
    assert!(
        !problems
            .iter()
            .any(|p| p.starts_with("kubernetes TrafficSplit")),
        "{problems:#?}"
    );
    assert!(
        problems.iter().any(|p| p.starts_with(
            "kubernetes TrafficTarget watch: TrafficTarget (access.smi-spec.io/v1alpha3)"
        )),
        "{problems:#?}"
    );
    assert!(
        problems.iter().any(|p| p.starts_with(
            "kubernetes TrafficPolicy watch: TrafficPolicy (policy.trellis.io/v1alpha1)"
        )),
        "{problems:#?}"
    );
    // The probe keeps failing (404): after a few probes the problems are still there.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        watch_problems(&index.status().borrow()).len(),
        trellis_smi::model::Kind::ALL.len() - 1
    );
}
