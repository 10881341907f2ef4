//! Kubernetes-specific behaviour on the fake API server: owner resolution (Flagger's primary and
//! canary pods differ only by owner), terminating endpoints, identity changes, pods that arrive
//! after their slice, shared watches, 410 Gone and relist, and bookmarks.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};
use trellis_discovery::{
    Discovery, DiscoveryError, Endpoint, OwnerRef, ProtocolHint, Readiness, ServiceKey, Snapshot,
};
use trellis_kube_fake::FakeApiServer;

const NS: &str = "trellis-test";

fn typed<K: serde::de::DeserializeOwned>(v: Value) -> K {
    serde_json::from_value(v).expect("a valid object")
}

fn service(name: &str) -> Service {
    typed(json!({
        "metadata": {"name": name, "namespace": NS},
        "spec": {"ports": [
            {"name": "http", "port": 80, "targetPort": "http", "appProtocol": "http"},
            {"name": "grpc", "port": 9000, "targetPort": 9000, "appProtocol": "grpc"},
        ]},
    }))
}

fn pod(name: &str, sa: Option<&str>, owner: Option<(&str, &str)>) -> Pod {
    let owners = owner.map(|(kind, name)| {
        json!([{"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": format!("uid-{name}"), "controller": true}])
    });
    typed(json!({
        "metadata": {"name": name, "namespace": NS, "labels": {"app": "web"}, "ownerReferences": owners},
        "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "pause"}]},
    }))
}

fn replicaset(name: &str, deployment: Option<&str>) -> ReplicaSet {
    let owners = deployment.map(|d| {
        json!([{"apiVersion": "apps/v1", "kind": "Deployment", "name": d, "uid": format!("uid-{d}"), "controller": true}])
    });
    typed(json!({
        "metadata": {"name": name, "namespace": NS, "ownerReferences": owners},
        "spec": {"selector": {"matchLabels": {"app": "web"}}},
    }))
}

/// One endpoint entry: (address, pod, ready, serving, terminating, zone).
type Entry<'a> = (&'a str, &'a str, bool, bool, bool, Option<&'a str>);

fn slice(name: &str, service: &str, entries: &[Entry<'_>]) -> EndpointSlice {
    let endpoints: Vec<Value> = entries
        .iter()
        .map(|(addr, pod, ready, serving, terminating, zone)| {
            json!({
                "addresses": [addr],
                "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
                "targetRef": {"kind": "Pod", "name": pod, "namespace": NS},
                "zone": zone,
            })
        })
        .collect();
    typed(json!({
        "metadata": {"name": name, "namespace": NS, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [
            {"name": "http", "port": 8080, "protocol": "TCP"},
            {"name": "grpc", "port": 9000, "protocol": "TCP", "appProtocol": "grpc"},
        ],
        "endpoints": endpoints,
    }))
}

async fn start() -> (common::KubeHarness, std::sync::Arc<FakeApiServer>) {
    let harness = common::fake_harness().await;
    let fake = harness.fake.clone().expect("fake");
    (harness, fake)
}

type Watch = BoxStream<'static, Result<Snapshot, DiscoveryError>>;

/// Waits until the watch yields a snapshot `check` accepts; panics with the last one otherwise.
async fn wait(watch: &mut Watch, what: &str, check: impl Fn(&Snapshot) -> bool) -> Snapshot {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut last = None;
    loop {
        match tokio::time::timeout_at(deadline, watch.next()).await {
            Ok(Some(Ok(s))) if check(&s) => return s,
            Ok(Some(Ok(s))) => last = Some(s),
            Ok(Some(Err(e))) => println!("error item while waiting for {what}: {e}"),
            Ok(None) => panic!("the watch ended while waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}; last snapshot: {last:#?}"),
        }
    }
}

fn endpoints(s: &Snapshot) -> &[Endpoint] {
    match s {
        Snapshot::Endpoints(set) => &set.endpoints,
        Snapshot::NotFound => &[],
    }
}

fn at<'a>(s: &'a Snapshot, addr: &str) -> Option<&'a Endpoint> {
    let addr: IpAddr = addr.parse().expect("address");
    endpoints(s).iter().find(|e| e.address == addr)
}

fn owner(kind: &str, name: &str) -> Option<OwnerRef> {
    Some(OwnerRef {
        kind: kind.into(),
        name: name.into(),
    })
}

#[tokio::test]
async fn owners_resolve_through_replicasets_and_tell_flagger_primary_from_canary() {
    let (harness, fake) = start().await;
    fake.put(&replicaset("web-primary-abc", Some("web-primary")))
        .unwrap();
    fake.put(&replicaset("web-canary-def", Some("web-canary")))
        .unwrap();
    fake.put(&replicaset("orphan-rs", None)).unwrap();
    fake.put(&pod(
        "p1",
        Some("web"),
        Some(("ReplicaSet", "web-primary-abc")),
    ))
    .unwrap();
    fake.put(&pod(
        "p2",
        Some("web"),
        Some(("ReplicaSet", "web-canary-def")),
    ))
    .unwrap();
    fake.put(&pod("p3", None, Some(("StatefulSet", "db"))))
        .unwrap();
    fake.put(&pod("p4", None, None)).unwrap();
    fake.put(&pod("p5", None, Some(("ReplicaSet", "orphan-rs"))))
        .unwrap();
    fake.put(&service("web")).unwrap();
    let entries: Vec<Entry<'_>> = ["p1", "p2", "p3", "p4", "p5"]
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4", "10.1.0.5"][i],
                *p,
                true,
                true,
                false,
                Some("zone-a"),
            )
        })
        .collect();
    fake.put(&slice("web-1", "web", &entries)).unwrap();

    let adapter = harness.adapter();
    let mut watch = adapter.watch(ServiceKey::new(NS, "web"));
    let s = wait(&mut watch, "five endpoints", |s| endpoints(s).len() == 5).await;
    assert_eq!(
        at(&s, "10.1.0.1").unwrap().owner,
        owner("Deployment", "web-primary")
    );
    assert_eq!(
        at(&s, "10.1.0.2").unwrap().owner,
        owner("Deployment", "web-canary")
    );
    assert_eq!(
        at(&s, "10.1.0.3").unwrap().owner,
        owner("StatefulSet", "db")
    );
    assert_eq!(at(&s, "10.1.0.4").unwrap().owner, owner("Pod", "p4"));
    assert_eq!(
        at(&s, "10.1.0.5").unwrap().owner,
        owner("ReplicaSet", "orphan-rs")
    );
    // Primary and canary share labels and identity: only the owner tells them apart.
    let (primary, canary) = (at(&s, "10.1.0.1").unwrap(), at(&s, "10.1.0.2").unwrap());
    assert_eq!(primary.labels, canary.labels);
    assert_eq!(primary.identity, canary.identity);
    assert_eq!(primary.identity.service_account, "web");
    assert_eq!(
        at(&s, "10.1.0.3").unwrap().identity.service_account,
        "default"
    );
    // Ports, protocol hints and zones.
    let Snapshot::Endpoints(set) = &s else {
        unreachable!()
    };
    assert_eq!(set.ports.len(), 2);
    assert_eq!(set.ports[0].protocol, Some(ProtocolHint::Http));
    assert_eq!(set.ports[1].protocol, Some(ProtocolHint::Grpc));
    assert_eq!(primary.zone.as_deref(), Some("zone-a"));
    assert_eq!(primary.protocol, Some(ProtocolHint::Grpc));
    let http = &set.ports[0];
    assert_eq!(
        primary.target_port(http),
        Some(8080),
        "the named port maps http:80 to 8080"
    );

    // A ReplicaSet adopted by another Deployment changes the owner of its pods.
    fake.put(&replicaset("orphan-rs", Some("adopter"))).unwrap();
    wait(&mut watch, "the adopted owner", |s| {
        at(s, "10.1.0.5").is_some_and(|e| e.owner == owner("Deployment", "adopter"))
    })
    .await;
}

#[tokio::test]
async fn terminating_endpoints_and_service_account_changes_show_as_new_snapshots() {
    let (harness, fake) = start().await;
    fake.put(&pod("a", Some("sa-1"), None)).unwrap();
    fake.put(&pod("b", None, None)).unwrap();
    fake.put(&pod("c", None, None)).unwrap();
    fake.put(&service("web")).unwrap();
    fake.put(&slice(
        "web-1",
        "web",
        &[
            ("10.2.0.1", "a", true, true, false, None),
            ("10.2.0.2", "b", false, true, true, None),
            ("10.2.0.3", "c", false, false, true, None),
        ],
    ))
    .unwrap();
    let adapter = harness.adapter();
    let mut watch = adapter.watch(ServiceKey::new(NS, "web"));
    let s = wait(&mut watch, "three endpoints", |s| endpoints(s).len() == 3).await;
    assert_eq!(at(&s, "10.2.0.1").unwrap().readiness, Readiness::Ready);
    assert_eq!(
        at(&s, "10.2.0.2").unwrap().readiness,
        Readiness::Terminating,
        "serving && terminating"
    );
    assert_eq!(
        at(&s, "10.2.0.3").unwrap().readiness,
        Readiness::NotReady,
        "terminating, not serving"
    );

    // The pod's service account changes (a redeploy reusing the name): a new identity.
    fake.put(&pod("a", Some("sa-2"), None)).unwrap();
    wait(&mut watch, "the new service account", |s| {
        at(s, "10.2.0.1").is_some_and(|e| e.identity.service_account == "sa-2")
    })
    .await;
}

#[tokio::test]
async fn an_endpoint_whose_pod_is_unknown_gets_no_traffic_until_the_pod_is_seen() {
    let (harness, fake) = start().await;
    fake.put(&service("web")).unwrap();
    let adapter = harness.adapter();
    let mut watch = adapter.watch(ServiceKey::new(NS, "web"));
    // A service with no slices is an empty set, not NotFound.
    wait(
        &mut watch,
        "an empty set",
        |s| matches!(s, Snapshot::Endpoints(set) if set.endpoints.is_empty()),
    )
    .await;

    fake.put(&slice(
        "web-1",
        "web",
        &[("10.3.0.1", "late", true, true, false, None)],
    ))
    .unwrap();
    let s = wait(&mut watch, "one endpoint", |s| endpoints(s).len() == 1).await;
    assert_eq!(
        at(&s, "10.3.0.1").unwrap().readiness,
        Readiness::NotReady,
        "identity unknown: fail safe"
    );

    fake.put(&pod("late", Some("late-sa"), None)).unwrap();
    wait(&mut watch, "the pod's identity", |s| {
        at(s, "10.3.0.1").is_some_and(|e| {
            e.readiness == Readiness::Ready && e.identity.service_account == "late-sa"
        })
    })
    .await;

    fake.delete::<Service>(Some(NS), "web").unwrap();
    wait(&mut watch, "NotFound", |s| matches!(s, Snapshot::NotFound)).await;
}

#[tokio::test]
async fn many_watched_services_share_one_watch_per_resource_kind() {
    let (harness, fake) = start().await;
    let adapter = harness.adapter();
    let mut watches = Vec::new();
    for i in 0..20 {
        let name = format!("svc-{i}");
        fake.put(&service(&name)).unwrap();
        watches.push(adapter.watch(ServiceKey::new(NS, &name)));
    }
    for w in &mut watches {
        wait(w, "the service", |s| matches!(s, Snapshot::Endpoints(_))).await;
    }
    wait_for_watches(&fake, 4).await;
    let started: Vec<String> = fake
        .store()
        .stats()
        .watches
        .into_iter()
        .map(|w| w.resource)
        .collect();
    assert_eq!(
        started.len(),
        4,
        "one watch each for services, endpointslices, pods, replicasets: {started:?}"
    );
}

/// Writes `n` unrelated objects (another namespace: the adapter's namespaced watches see none).
fn unrelated_writes(fake: &FakeApiServer, n: usize) {
    for i in 0..n {
        let mut s = service(&format!("noise-{i}"));
        s.metadata.namespace = Some("elsewhere".into());
        fake.put(&s).unwrap();
    }
}

/// Waits until `n` more watches than `before` have started.
async fn watches_started(
    fake: &FakeApiServer,
    before: usize,
    n: usize,
) -> Vec<trellis_kube_fake::WatchStart> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let watches = fake.store().stats().watches;
        if watches.len() >= before + n {
            return watches[before..].to_vec();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the adapter did not re-watch: {watches:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_compacted_version_means_410_gone_and_a_relist_that_restores_the_truth() {
    let (harness, fake) = start().await;
    let instance = |id: &str, n: u8, sa: Option<&str>| trellis_discovery_suite::TestInstance {
        service_account: sa.map(str::to_owned),
        ..trellis_discovery_suite::TestInstance::new(id, std::net::Ipv4Addr::new(10, 4, 0, n), 8080)
    };
    use trellis_discovery_suite::TestRegistry;
    harness
        .put_service("web", &[instance("one", 1, None), instance("two", 2, None)])
        .await
        .unwrap();
    let adapter = harness.adapter();
    let mut watch = adapter.watch(ServiceKey::new(NS, "web"));
    wait(&mut watch, "two endpoints", |s| endpoints(s).len() == 2).await;
    let lists_before = fake.store().stats().lists;

    // While the adapter cannot see: one instance goes, the other changes identity, and the
    // history is compacted, so the adapter's resume version is gone.
    fake.begin_outage();
    fake.put(&harness.slices_for("web", &[instance("two", 2, Some("renamed"))])[0])
        .unwrap();
    fake.put(&harness.pod_for("web", &instance("two", 2, Some("renamed"))))
        .unwrap();
    fake.delete::<Pod>(Some(NS), &common::KubeHarness::pod_name("web", "one"))
        .unwrap();
    fake.compact();
    let before = fake.store().stats().watches.len();
    fake.end_outage().await.unwrap();

    let s = wait(&mut watch, "the state after the relist", |s| {
        endpoints(s).len() == 1
            && at(s, "10.4.0.2").is_some_and(|e| e.identity.service_account == "renamed")
    })
    .await;
    assert_eq!(at(&s, "10.4.0.2").unwrap().readiness, Readiness::Ready);
    let restarted = watches_started(&fake, before, 1).await;
    assert!(
        restarted.iter().any(|w| w.gone),
        "a resumed watch got 410: {restarted:?}"
    );
    let lists_after = fake.store().stats().lists;
    assert!(
        lists_after.get("endpointslices") > lists_before.get("endpointslices"),
        "410 made the adapter relist: {lists_before:?} -> {lists_after:?}"
    );
}

#[tokio::test]
async fn bookmarks_keep_resume_versions_fresh_so_compaction_needs_no_relist() {
    let (harness, fake) = start().await;
    fake.put(&service("web")).unwrap();
    let adapter = harness.adapter();
    let mut watch = adapter.watch(ServiceKey::new(NS, "web"));
    wait(&mut watch, "the service", |s| {
        matches!(s, Snapshot::Endpoints(_))
    })
    .await;
    wait_for_watches(&fake, 4).await;

    // Without a bookmark: the watches' versions fall behind unrelated writes; after compaction
    // and a watch restart every reflector gets 410 and relists.
    unrelated_writes(&fake, 5);
    fake.compact();
    let before = fake.store().stats().watches.len();
    fake.close_watches();
    let restarted = watches_started(&fake, before, 4).await;
    assert!(
        restarted.iter().all(|w| w.gone),
        "stale resume versions get 410: {restarted:?}"
    );
    // Let the relists and new watches settle.
    wait_for_watches(&fake, 4).await;
    let settled = fake.store().stats().watches.len();
    let lists = fake.store().stats().lists;

    // With a bookmark at the current version: resuming after compaction works, no relist.
    unrelated_writes(&fake, 5);
    fake.send_bookmarks();
    let bookmark = fake.store().resource_version();
    fake.compact();
    fake.close_watches();
    let resumed = watches_started(&fake, settled, 4).await;
    for w in &resumed {
        assert!(!w.gone, "resumed from a bookmark, not gone: {resumed:?}");
        assert_eq!(
            w.resource_version.as_deref(),
            Some(bookmark.to_string().as_str()),
            "{resumed:?}"
        );
    }
    assert_eq!(
        fake.store().stats().lists,
        lists,
        "no relist after a bookmark"
    );
}

/// Waits until `n` watches are open on the fake server.
async fn wait_for_watches(fake: &FakeApiServer, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while fake.store().watch_count() != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "expected {n} open watches, have {}",
            fake.store().watch_count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next answer of an address watch (within 5 s).
async fn next_owner(
    w: &mut BoxStream<'static, Result<trellis_discovery::AddressOwner, DiscoveryError>>,
) -> trellis_discovery::AddressOwner {
    match tokio::time::timeout(Duration::from_secs(5), w.next()).await {
        Ok(Some(Ok(owner))) => owner,
        other => panic!("no address answer: {other:?}"),
    }
}

#[tokio::test]
async fn an_address_is_a_services_cluster_ip_or_an_endpoint_and_follows_changes() {
    use trellis_discovery::AddressOwner;
    let (harness, fake) = start().await;
    fake.put(&pod("a", Some("sa-a"), None)).unwrap();
    fake.put(&slice(
        "web-1",
        "web",
        &[("10.2.0.1", "a", true, true, false, None)],
    ))
    .unwrap();
    let adapter = harness.adapter();
    let vip: IpAddr = "10.96.0.10".parse().unwrap();
    let mut by_vip = adapter.watch_address(vip);
    let mut by_pod = adapter.watch_address("10.2.0.1".parse().unwrap());
    assert_eq!(next_owner(&mut by_vip).await, AddressOwner::Unknown);

    // A Service created after the first ask, holding the address: found, with its ports.
    let mut web = service("web");
    web.spec.as_mut().unwrap().cluster_ip = Some(vip.to_string());
    web.spec.as_mut().unwrap().cluster_ips = Some(vec![vip.to_string()]);
    fake.put(&web).unwrap();
    match next_owner(&mut by_vip).await {
        AddressOwner::Service { service, ports } => {
            assert_eq!(service, ServiceKey::new(NS, "web"));
            assert_eq!(ports.iter().map(|p| p.port).collect::<Vec<_>>(), [80, 9000]);
        }
        other => panic!("want the Service, got {other:?}"),
    }
    // A pod IP: that endpoint, with its pod's identity.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, by_pod.next()).await {
            Ok(Some(Ok(AddressOwner::Endpoint { service, endpoint }))) => {
                assert_eq!(service, ServiceKey::new(NS, "web"));
                assert_eq!(endpoint.identity.service_account, "sa-a");
                break;
            }
            Ok(Some(_)) => {}
            other => panic!("no endpoint answer for the pod IP: {other:?}"),
        }
    }
    // Deleted: unknown again.
    fake.delete::<Service>(Some(NS), "web").unwrap();
    assert_eq!(next_owner(&mut by_vip).await, AddressOwner::Unknown);
}
