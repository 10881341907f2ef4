//! Leases and Events are built-in types, and PUT is optimistic: a replace carrying a stale
//! `metadata.resourceVersion` gets 409 Conflict, the basis of Lease-based leader election.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ObjectMeta, PostParams};
use trellis_kube_fake::FakeApiServer;

fn client(server: &FakeApiServer) -> kube::Client {
    let config = kube::Config::new(server.url().parse().expect("url"));
    kube::Client::try_from(config).expect("client")
}

fn lease(holder: &str) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some("leader".into()),
            namespace: Some("trellis-system".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            ..Default::default()
        }),
    }
}

#[tokio::test]
async fn a_replace_with_a_stale_resource_version_gets_409_conflict() {
    let server = FakeApiServer::start().await.unwrap();
    let leases: Api<Lease> = Api::namespaced(client(&server), "trellis-system");
    let created = leases
        .create(&PostParams::default(), &lease("a"))
        .await
        .unwrap();
    let stale = created.metadata.resource_version.clone();
    assert!(stale.is_some(), "the server stamps a resourceVersion");

    // Replica b replaces the version it read: accepted, a new resourceVersion.
    let mut by_b = created.clone();
    by_b.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let replaced = leases
        .replace("leader", &PostParams::default(), &by_b)
        .await
        .unwrap();
    assert_ne!(replaced.metadata.resource_version, stale);

    // Replica c still holds the old version: its replace loses.
    let mut by_c = created;
    by_c.spec.as_mut().unwrap().holder_identity = Some("c".into());
    let lost = leases
        .replace("leader", &PostParams::default(), &by_c)
        .await
        .unwrap_err();
    assert!(
        matches!(lost, kube::Error::Api(ref s) if s.code == 409 && s.reason == "Conflict"),
        "{lost:?}"
    );
    let now = leases.get("leader").await.unwrap();
    assert_eq!(now.spec.unwrap().holder_identity.as_deref(), Some("b"));
}

#[tokio::test]
async fn events_k8s_io_events_can_be_created_and_patched() {
    let server = FakeApiServer::start().await.unwrap();
    let events: Api<Event> = Api::namespaced(client(&server), "shop");
    let event = Event {
        metadata: ObjectMeta {
            name: Some("web.1".into()),
            ..Default::default()
        },
        reason: Some("Problem".into()),
        note: Some("weights sum to 0".into()),
        ..Default::default()
    };
    events.create(&PostParams::default(), &event).await.unwrap();
    let patch = serde_json::json!({"series": {"count": 2, "lastObservedTime": "2026-01-01T00:00:00.000000Z"}});
    let patched = events
        .patch(
            "web.1",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    assert_eq!(patched.series.map(|s| s.count), Some(2));
    assert_eq!(patched.note.as_deref(), Some("weights sum to 0"));
}
