//! Kubernetes Events for policy problems, against the fake API server: the Kubernetes policy
//! source and the Kubernetes discovery adapter feed a real index, and `events::spawn` writes
//! events.k8s.io/v1 Events about the SMI objects at fault: one per (object, problem), counted on
//! repeats, only from the leader, none for problems from policy files.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};
use support::wait_status;
use tokio::sync::watch;
use trellis_controller_core::index::{Index, IndexOptions, Status};
use trellis_controller_core::policy::PolicySource;
use trellis_controller_core::policy::files::FilePolicySource;
use trellis_controller_kubernetes::events::{self, EventOptions};
use trellis_controller_kubernetes::leader::{LeaderOptions, Leadership};
use trellis_controller_kubernetes::policy::KubernetesPolicySource;
use trellis_discovery::ServiceKey;
use trellis_kube_fake::{FakeApiServer, ResourceType};
use trellis_testing::{kube_client, smi_api_server, split_type};

fn split(name: &str, root: &str, backends: &[(&str, i64)], groups: &[&str]) -> Value {
    let backends: Vec<Value> = backends
        .iter()
        .map(|(service, weight)| json!({"service": service, "weight": weight}))
        .collect();
    let matches: Vec<Value> = groups
        .iter()
        .map(|g| json!({"kind": "HTTPRouteGroup", "name": g}))
        .collect();
    json!({
        "apiVersion": "split.smi-spec.io/v1alpha4",
        "kind": "TrafficSplit",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"service": root, "backends": backends, "matches": matches},
    })
}

fn service(name: &str, port: u16) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"ports": [{"name": "http", "port": port, "targetPort": port, "appProtocol": "http"}]},
    })
}

fn service_type() -> ResourceType {
    ResourceType::of::<k8s_openapi::api::core::v1::Service>(true)
}

/// The index over the Kubernetes source (plus `extra` sources) and Kubernetes discovery.
fn index(
    server: &FakeApiServer,
    extra: Vec<Arc<dyn PolicySource>>,
) -> (Index, trellis_controller_kubernetes::policy::ObjectRefs) {
    let source = KubernetesPolicySource::new(kube_client(server));
    let objects = source.objects();
    let mut sources: Vec<Arc<dyn PolicySource>> = vec![Arc::new(source)];
    sources.extend(extra);
    let discovery = support::discovery(server);
    let index = Index::start(sources, Arc::new(discovery), IndexOptions::default());
    (index, objects)
}

fn has_problem(status: &Status, resource: &str, words: &str) -> bool {
    status
        .problems
        .iter()
        .any(|p| p.resource == resource && p.message.contains(words))
}

async fn list_events(server: &FakeApiServer) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(kube_client(server), "shop");
    api.list(&ListParams::default()).await.unwrap().items
}

/// Waits until the Events satisfy `wanted`; returns them.
async fn wait_events(
    server: &FakeApiServer,
    what: &str,
    wanted: impl Fn(&[Event]) -> bool,
) -> Vec<Event> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let events = list_events(server).await;
        if wanted(&events) {
            return events;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no Events with {what} within 10 s; Events: {:#?}",
            summary(&events)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// (object name, reason) -> (count, note) of every Event.
fn summary(events: &[Event]) -> BTreeMap<(String, String), (i32, String)> {
    let mut out = BTreeMap::new();
    for e in events {
        let object = e
            .regarding
            .as_ref()
            .and_then(|r| r.name.clone())
            .unwrap_or_default();
        let previous = out.insert(
            (object, e.reason.clone().unwrap_or_default()),
            (
                e.series.as_ref().map_or(1, |s| s.count),
                e.note.clone().unwrap_or_default(),
            ),
        );
        assert!(
            previous.is_none(),
            "two Events for one problem: {events:#?}"
        );
    }
    out
}

fn count_of(events: &[Event], object: &str, reason: &str) -> Option<i32> {
    summary(events)
        .get(&(object.to_owned(), reason.to_owned()))
        .map(|(count, _)| *count)
}

#[tokio::test]
async fn every_problem_of_an_smi_object_becomes_one_event_from_the_leader_only() {
    let server = smi_api_server().await;
    let store = server.store();
    for (name, port) in [("web", 80), ("web-v1", 80), ("web-v3", 8080), ("api", 80)] {
        store.apply(&service_type(), service(name, port)).unwrap();
    }
    // web: one backend missing (web-v2), one on another port (web-v3), a missing route group.
    store
        .apply(
            &split_type(),
            split(
                "web",
                "web",
                &[("web-v1", 1), ("web-v2", 1), ("web-v3", 1)],
                &["missing-group"],
            ),
        )
        .unwrap();
    // A second split for the same root (newer: ignored).
    store
        .apply(&split_type(), split("web-b", "web", &[("web-v1", 1)], &[]))
        .unwrap();
    store
        .apply(&split_type(), split("zero", "api", &[("web-v1", 0)], &[]))
        .unwrap();
    // The smi crate rejects it (a negative weight).
    store
        .apply(&split_type(), split("bad", "api", &[("web-v1", -1)], &[]))
        .unwrap();
    // A problem from a policy file: never an Event.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("split.yaml"),
        "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {name: from-file, namespace: shop}\nspec:\n  service: other\n  backends: [{service: web-v1, weight: 0}]\n",
    )
    .unwrap();
    let files: Arc<dyn PolicySource> = Arc::new(FilePolicySource::new(vec![dir.path().to_owned()]));
    let (index, objects) = index(&server, vec![files]);
    // A proxy asks for web: the index resolves it against discovery (missing backend, port).
    let _web = index.destination(ServiceKey::new("shop", "web")).await;

    let (leader_tx, leader) = watch::channel(false);
    let writer = events::spawn(
        kube_client(&server),
        index.status(),
        objects,
        leader,
        EventOptions::new("replica-a"),
    );
    wait_status(&index, "every problem", |s| {
        has_problem(s, "TrafficSplit shop/web", "does not exist")
            && has_problem(s, "TrafficSplit shop/web", "lacks the root's port")
            && has_problem(s, "TrafficSplit shop/web", "is referenced but missing")
            && has_problem(s, "TrafficSplit shop/web", "several splits for one root")
            && has_problem(s, "TrafficSplit shop/zero", "weights sum to 0")
            && has_problem(s, "TrafficSplit shop/bad", "not applied")
            && has_problem(s, "TrafficSplit shop/from-file", "weights sum to 0")
    })
    .await;
    // Every problem is located: at the object for the Kubernetes source's, at file:line for the
    // file's (which is why that one is no Event).
    let located = |resource: &str, words: &str| -> Vec<String> {
        let status = index.status().borrow().clone();
        status
            .problems
            .iter()
            .filter(|p| p.resource == resource && p.message.contains(words))
            .map(|p| p.location.clone())
            .collect()
    };
    assert_eq!(
        located("TrafficSplit shop/zero", "weights sum to 0"),
        ["kubernetes TrafficSplit shop/zero"]
    );
    assert_eq!(
        located("TrafficSplit shop/web", "does not exist"),
        ["kubernetes TrafficSplit shop/web"]
    );
    assert_eq!(
        located("TrafficSplit shop/from-file", "weights sum to 0"),
        [format!("{}:1", dir.path().join("split.yaml").display())]
    );
    // Not the leader: nothing written.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        list_events(&server).await.is_empty(),
        "a follower wrote Events"
    );

    leader_tx.send_replace(true);
    let expected = [
        ("web", "BackendMissing"),
        ("web", "BackendPortMismatch"),
        ("web", "RouteGroupMissing"),
        ("web", "SeveralSplitsForRoot"),
        ("zero", "WeightsSumToZero"),
        ("bad", "InvalidPolicy"),
    ];
    let written = wait_events(&server, "every problem", |events| {
        expected
            .iter()
            .all(|(object, reason)| count_of(events, object, reason).is_some())
    })
    .await;
    let summary = summary(&written);
    assert_eq!(
        summary.len(),
        expected.len(),
        "one Event per problem of an SMI object, none for the file's: {summary:#?}"
    );
    let splits: Api<trellis_smi::api::split::v1alpha4::TrafficSplit> =
        Api::namespaced(kube_client(&server), "shop");
    let web = splits.get("web").await.unwrap().metadata;
    let (web_uid, web_version) = (web.uid, web.resource_version);
    for event in &written {
        let regarding = event.regarding.as_ref().unwrap();
        assert_eq!(
            regarding.api_version.as_deref(),
            Some("split.smi-spec.io/v1alpha4")
        );
        assert_eq!(regarding.kind.as_deref(), Some("TrafficSplit"));
        assert_eq!(regarding.namespace.as_deref(), Some("shop"));
        if regarding.name.as_deref() == Some("web") {
            assert_eq!(regarding.uid, web_uid);
        }
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        assert_eq!(event.reporting_instance.as_deref(), Some("replica-a"));
        assert!(event.event_time.is_some() && event.action.is_some());
    }
    let missing = &summary[&("web".to_owned(), "BackendMissing".to_owned())].1;
    assert!(
        missing.starts_with("backend shop/web-v2: "),
        "the note says where: {missing}"
    );

    // The problem goes and comes back: the same Event, counted, not a second one.
    store
        .apply(&split_type(), split("zero", "api", &[("web-v1", 1)], &[]))
        .unwrap();
    wait_status(&index, "zero fixed", |s| {
        !has_problem(s, "TrafficSplit shop/zero", "weights sum to 0")
    })
    .await;
    store
        .apply(&split_type(), split("zero", "api", &[("web-v1", 0)], &[]))
        .unwrap();
    let events = wait_events(&server, "zero counted twice", |e| {
        count_of(e, "zero", "WeightsSumToZero") == Some(2)
    })
    .await;
    assert_eq!(summary_len(&events), expected.len());
    // The writer never writes to SMI objects: web is still at the version this test wrote.
    assert_eq!(
        splits.get("web").await.unwrap().metadata.resource_version,
        web_version
    );

    // A follower again: repeats are not written.
    leader_tx.send_replace(false);
    tokio::time::sleep(Duration::from_millis(200)).await;
    store
        .apply(&split_type(), split("zero", "api", &[("web-v1", 1)], &[]))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    store
        .apply(&split_type(), split("zero", "api", &[("web-v1", 0)], &[]))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        count_of(&list_events(&server).await, "zero", "WeightsSumToZero"),
        Some(2)
    );
    writer.abort();
}

fn summary_len(events: &[Event]) -> usize {
    summary(events).len()
}

fn elector(server: &FakeApiServer, identity: &str) -> Leadership {
    let mut options = LeaderOptions::new("trellis-system", "trellis-controller");
    options.identity = identity.into();
    options.lease_duration = Duration::from_secs(2);
    options.retry_period = Duration::from_millis(200);
    trellis_controller_kubernetes::leader::elect(kube_client(server), options)
}

#[tokio::test]
async fn two_replicas_write_one_event_and_a_new_leader_counts_on_it() {
    let server = smi_api_server().await;
    server
        .store()
        .apply(&split_type(), split("zero", "api", &[("web-v1", 0)], &[]))
        .unwrap();
    let mut replicas = Vec::new();
    for identity in ["replica-a", "replica-b"] {
        let (index, objects) = index(&server, Vec::new());
        let leadership = elector(&server, identity);
        let writer = events::spawn(
            kube_client(&server),
            index.status(),
            objects,
            leadership.is_leader(),
            EventOptions::new(identity),
        );
        replicas.push((index, leadership, writer));
    }
    let events = wait_events(&server, "the Event", |e| {
        count_of(e, "zero", "WeightsSumToZero").is_some()
    })
    .await;
    let leader = replicas
        .iter()
        .position(|(_, l, _)| *l.is_leader().borrow())
        .expect("a leader");
    let leader_id = replicas[leader].1.status().borrow().identity.clone();
    assert_eq!(events.len(), 1, "{:#?}", summary(&events));
    assert_eq!(
        events[0].reporting_instance.as_deref(),
        Some(leader_id.as_str())
    );
    // Both replicas see the problem; only the leader wrote. A while later, still one Event.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let events = list_events(&server).await;
    assert_eq!(events.len(), 1);
    assert_eq!(count_of(&events, "zero", "WeightsSumToZero"), Some(1));

    // The leader crashes; the other takes over and re-observes the standing problem on the
    // same Event (its name is the same on every replica).
    replicas[leader].1.abandon();
    replicas[leader].2.abort();
    let events = wait_events(&server, "the new leader's count", |e| {
        count_of(e, "zero", "WeightsSumToZero") == Some(2)
    })
    .await;
    assert_eq!(events.len(), 1, "{:#?}", summary(&events));
}
