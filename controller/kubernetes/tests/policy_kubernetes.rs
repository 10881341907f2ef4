//! The Kubernetes policy source against the fake API server (real list/watch over HTTP on
//! loopback) with the SMI CRDs registered at their stored versions, and, when
//! TRELLIS_TEST_KUBECONFIG names a kubeconfig, a smoke test against a real API server.

use std::time::Duration;

use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use serde_json::{Value, json};
use trellis_controller_core::policy::{PolicySet, PolicySource};
use trellis_controller_kubernetes::policy::KubernetesPolicySource;
use trellis_kube_fake::FakeApiServer;
use trellis_smi::model::{Policy, ResourceId, Weight};
use trellis_testing::{Kind, kube_client, smi_api_server, smi_type, split_type};

fn split(name: &str, weights: Value) -> Value {
    json!({
        "apiVersion": "split.smi-spec.io/v1alpha4",
        "kind": "TrafficSplit",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"service": "web", "backends": [
            {"service": "web-v1", "weight": weights[0]},
            {"service": "web-v2", "weight": weights[1]},
        ]},
    })
}

/// Waits (at most 5 s) for a set that satisfies `wanted`; fails with the last set seen.
async fn wait_for(
    sets: &mut BoxStream<'static, PolicySet>,
    what: &str,
    wanted: impl Fn(&PolicySet) -> bool,
) -> PolicySet {
    let mut last = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, sets.next()).await {
            Ok(Some(set)) if wanted(&set) => return set,
            Ok(Some(set)) => last = Some(set),
            Ok(None) => panic!("the source ended"),
            Err(_) => panic!("no set with {what} within 5 s; last: {last:#?}"),
        }
    }
}

/// (namespace/name, weights in milli) of every split in force.
fn splits(set: &PolicySet) -> Vec<(String, Vec<u64>)> {
    set.policies
        .iter()
        .filter_map(|p| match p {
            Policy::TrafficSplit(s) => Some((
                format!(
                    "{}/{}",
                    s.metadata.namespace.as_deref().unwrap_or(""),
                    s.metadata.name.as_deref().unwrap_or("")
                ),
                s.backends.iter().map(|b| b.weight.milli()).collect(),
            )),
            _ => None,
        })
        .collect()
}

fn named(name: &str, weights: &[u64]) -> (String, Vec<u64>) {
    (format!("shop/{name}"), weights.to_vec())
}

#[tokio::test]
async fn creates_updates_and_deletes_become_new_sets() {
    let server = smi_api_server().await;
    let store = server.store();
    store
        .apply(&split_type(), split("web", json!([90, 10])))
        .unwrap();
    let source = KubernetesPolicySource::new(kube_client(&server));
    assert_eq!(source.name(), "kubernetes");
    let mut sets = source.watch();

    let first = wait_for(&mut sets, "the listed split", |s| !s.policies.is_empty()).await;
    assert_eq!(splits(&first), vec![named("web", &[90_000, 10_000])]);
    assert!(first.problems.is_empty(), "{:?}", first.problems);

    store
        .apply(&split_type(), split("api", json!([1, 0])))
        .unwrap();
    let set = wait_for(&mut sets, "the created split", |s| splits(s).len() == 2).await;
    assert_eq!(
        splits(&set),
        vec![named("api", &[1000, 0]), named("web", &[90_000, 10_000])]
    );

    store
        .apply(&split_type(), split("web", json!([50, 50])))
        .unwrap();
    let set = wait_for(&mut sets, "the updated weights", |s| {
        splits(s).contains(&named("web", &[50_000, 50_000]))
    })
    .await;
    assert_eq!(splits(&set).len(), 2);

    store.delete(&split_type(), Some("shop"), "api").unwrap();
    let set = wait_for(&mut sets, "the split deleted", |s| splits(s).len() == 1).await;
    assert_eq!(splits(&set), vec![named("web", &[50_000, 50_000])]);

    // Other kinds go through the same model.
    store
        .apply(
            &smi_type(Kind::TcpRoute),
            json!({"apiVersion": "specs.smi-spec.io/v1alpha4", "kind": "TCPRoute",
                   "metadata": {"name": "db", "namespace": "shop"},
                   "spec": {"matches": {"ports": [5432]}}}),
        )
        .unwrap();
    let set = wait_for(&mut sets, "the TCPRoute", |s| s.policies.len() == 2).await;
    assert!(
        set.policies
            .iter()
            .any(|p| matches!(p, Policy::TcpRoute(r) if r.ports == vec![5432])),
        "{set:#?}"
    );
}

#[tokio::test]
async fn a_bad_update_keeps_the_last_good_version_and_is_reported() {
    let server = smi_api_server().await;
    let store = server.store();
    store
        .apply(&split_type(), split("web", json!([90, 10])))
        .unwrap();
    let mut sets = KubernetesPolicySource::new(kube_client(&server)).watch();
    wait_for(&mut sets, "the listed split", |s| !s.policies.is_empty()).await;

    // Negative weights pass a schema-less fake; the source must refuse them.
    store
        .apply(&split_type(), split("web", json!([90, -5])))
        .unwrap();
    let set = wait_for(&mut sets, "a problem", |s| !s.problems.is_empty()).await;
    assert_eq!(splits(&set), vec![named("web", &[90_000, 10_000])]);
    assert_eq!(set.problems.len(), 1, "{:?}", set.problems);
    let problem = &set.problems[0];
    assert_eq!(problem.resource, "TrafficSplit shop/web");
    assert_eq!(problem.location, "kubernetes TrafficSplit shop/web");
    assert!(
        problem.message.starts_with("spec.backends[1].weight: ")
            && problem
                .message
                .ends_with("; the previous version stays in force"),
        "{}",
        problem.message
    );

    // A validation failure (a path regex that does not compile) is reported the same way, and a
    // bad resource never seen good contributes nothing.
    let routes = smi_type(Kind::HttpRouteGroup);
    store
        .apply(
            &routes,
            json!({"apiVersion": "specs.smi-spec.io/v1alpha4", "kind": "HTTPRouteGroup",
                   "metadata": {"name": "r", "namespace": "shop"},
                   "spec": {"matches": [{"name": "m", "pathRegex": "(unclosed"}]}}),
        )
        .unwrap();
    let set = wait_for(&mut sets, "two problems", |s| s.problems.len() == 2).await;
    let regex = set
        .problems
        .iter()
        .find(|p| p.resource == "HTTPRouteGroup shop/r")
        .expect("the route group is reported");
    assert!(
        regex.message.starts_with("spec.matches[0].pathRegex: ")
            && regex.message.ends_with("; not applied"),
        "{}",
        regex.message
    );
    assert_eq!(regex.location, "kubernetes HTTPRouteGroup shop/r");
    assert_eq!(set.policies.len(), 1, "{:#?}", set.policies);
    // Every resource in force is located at its object (where the index's problems point); one
    // never seen good has no origin.
    let id = |kind: &str, name: &str| ResourceId {
        kind: kind.into(),
        namespace: "shop".into(),
        name: name.into(),
    };
    assert_eq!(
        set.origins.get(&id("TrafficSplit", "web")).map(|o| &**o),
        Some("kubernetes TrafficSplit shop/web")
    );
    assert_eq!(set.origins.len(), 1, "{:?}", set.origins);

    // Fixing the object replaces the kept version and clears the problem.
    store
        .apply(&split_type(), split("web", json!([0, 100])))
        .unwrap();
    let set = wait_for(&mut sets, "the fixed split", |s| {
        splits(s) == vec![named("web", &[0, 100_000])]
    })
    .await;
    assert_eq!(
        set.problems.len(),
        1,
        "only the route group: {:?}",
        set.problems
    );
}

#[tokio::test]
async fn a_relist_after_410_gone_gives_the_correct_set() {
    let server = smi_api_server().await;
    let store = server.store();
    store
        .apply(&split_type(), split("web", json!([90, 10])))
        .unwrap();
    store
        .apply(&split_type(), split("old", json!([1, 1])))
        .unwrap();
    let mut sets = KubernetesPolicySource::new(kube_client(&server)).watch();
    wait_for(&mut sets, "both splits", |s| splits(s).len() == 2).await;
    // A bad version while the good one is in force: the relist must keep the good one.
    store
        .apply(&split_type(), split("web", json!([90, -1])))
        .unwrap();
    wait_for(&mut sets, "the problem", |s| !s.problems.is_empty()).await;

    // Changes the watches must not see as events: compaction makes their resume point too old.
    let watches_before = store.stats().watches.len();
    server.begin_outage();
    store.delete(&split_type(), Some("shop"), "old").unwrap();
    store
        .apply(&split_type(), split("new", json!([3, 1])))
        .unwrap();
    server.compact();
    server.end_outage().await.unwrap();

    let set = wait_for(&mut sets, "the relisted set", |s| {
        splits(s).iter().any(|(n, _)| n == "shop/new")
    })
    .await;
    assert_eq!(
        splits(&set),
        vec![named("new", &[3000, 1000]), named("web", &[90_000, 10_000])]
    );
    assert_eq!(set.problems.len(), 1, "{:?}", set.problems);
    assert_eq!(set.problems[0].resource, "TrafficSplit shop/web");
    let stats = store.stats();
    assert!(
        stats.watches[watches_before..].iter().any(|w| w.gone),
        "a watch resumed from before the compaction and got 410: {:?}",
        stats.watches
    );
}

#[tokio::test]
async fn an_outage_keeps_the_last_set_and_changes_flow_after_it() {
    let server = smi_api_server().await;
    let store = server.store();
    store
        .apply(&split_type(), split("web", json!([90, 10])))
        .unwrap();
    let mut sets = KubernetesPolicySource::new(kube_client(&server)).watch();
    wait_for(&mut sets, "the split", |s| !s.policies.is_empty()).await;

    // While the API server is gone the watchers fail and back off; no set that drops policy.
    server.begin_outage();
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Some(Some(set)) = sets.next().now_or_never() {
        assert_eq!(splits(&set), vec![named("web", &[90_000, 10_000])]);
    }
    store
        .apply(&split_type(), split("web", json!([10, 90])))
        .unwrap();
    server.end_outage().await.unwrap();
    // The watch failures reported during the outage clear once every kind answers again.
    wait_for(
        &mut sets,
        "the change made during the outage, no problems",
        |s| splits(s) == vec![named("web", &[10_000, 90_000])] && s.problems.is_empty(),
    )
    .await;
}

/// TrafficPolicy objects go the same way: a bad new version (a percent over 100, which only
/// trellis-policy's checks catch) keeps the last good one, reported at the object with its field.
#[tokio::test]
async fn a_bad_traffic_policy_keeps_the_last_good_version_and_is_reported() {
    let server = smi_api_server().await;
    let store = server.store();
    let policies = smi_type(Kind::TrafficPolicy);
    let policy = |percent: f64| {
        json!({"apiVersion": "policy.trellis.io/v1alpha1", "kind": "TrafficPolicy",
               "metadata": {"name": "web", "namespace": "shop"},
               "spec": {"targetRef": {"name": "web"},
                        "fault": {"abort": {"httpStatus": 503, "percent": percent}}}})
    };
    let percent = |set: &PolicySet| -> Vec<f64> {
        set.policies
            .iter()
            .filter_map(|p| match p {
                Policy::TrafficPolicy(p) => Some(p.policy.fault.as_ref()?.abort.as_ref()?.percent),
                _ => None,
            })
            .collect()
    };
    store.apply(&policies, policy(5.0)).unwrap();
    let mut sets = KubernetesPolicySource::new(kube_client(&server)).watch();
    wait_for(&mut sets, "the policy", |s| percent(s) == [5.0]).await;

    store.apply(&policies, policy(150.0)).unwrap();
    let set = wait_for(&mut sets, "a problem", |s| !s.problems.is_empty()).await;
    assert_eq!(percent(&set), [5.0], "the last good version stays");
    assert_eq!(set.problems.len(), 1, "{:?}", set.problems);
    let problem = &set.problems[0];
    assert_eq!(problem.resource, "TrafficPolicy shop/web");
    assert_eq!(problem.location, "kubernetes TrafficPolicy shop/web");
    assert_eq!(
        problem.message,
        "spec.fault.abort.percent: 150 is not a percent (0 to 100); the previous version stays in force"
    );
}

/// A kind whose CRD is not installed (404) must not hold back the other kinds.
#[tokio::test]
async fn a_missing_crd_does_not_hold_back_the_set() {
    let server = FakeApiServer::start().await.unwrap();
    server.register(split_type());
    server
        .store()
        .apply(&split_type(), split("web", json!([1, 1])))
        .unwrap();
    let mut sets = KubernetesPolicySource::namespaced(kube_client(&server), "shop").watch();
    let set = wait_for(&mut sets, "the split", |s| !s.policies.is_empty()).await;
    assert_eq!(splits(&set), vec![named("web", &[1000, 1000])]);
}

/// Against a real cluster with the SMI CRDs installed (`trellis crds | kubectl apply -f -`).
#[tokio::test]
async fn real_api_server_smoke() {
    let Ok(path) = std::env::var("TRELLIS_TEST_KUBECONFIG") else {
        eprintln!(
            "skipped: set TRELLIS_TEST_KUBECONFIG to a kubeconfig to run against a real API server"
        );
        return;
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("reading the kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("a usable kubeconfig");
    let client = kube::Client::try_from(config).unwrap();
    let resource = trellis_controller_kubernetes::policy::stored_resource(
        trellis_smi::model::Kind::TrafficSplit,
    );
    let api: kube::Api<kube::api::DynamicObject> =
        kube::Api::namespaced_with(client.clone(), "default", &resource);
    let name = format!("trellis-smoke-{}", std::process::id());
    let object: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "split.smi-spec.io/v1alpha4", "kind": "TrafficSplit",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"service": "web", "backends": [{"service": "web-v1", "weight": 1}]},
    }))
    .unwrap();
    if let Err(error) = api.create(&Default::default(), &object).await {
        eprintln!("skipped: cannot create a TrafficSplit (are the SMI CRDs installed?): {error}");
        return;
    }
    let mut sets = KubernetesPolicySource::namespaced(client, "default").watch();
    let wanted = format!("default/{name}");
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(set) = sets.next().await {
            if splits(&set)
                .iter()
                .any(|(n, w)| *n == wanted && *w == vec![Weight::units(1).milli()])
            {
                return true;
            }
        }
        false
    })
    .await;
    let _ = api.delete(&name, &Default::default()).await;
    assert_eq!(found, Ok(true), "the TrafficSplit never appeared in a set");
}

/// ExternalService objects are watched like the other kinds (the CRD kube-fake serves is the
/// generated one): a good one is in the set, located at the object; a bad new version (a
/// caBundle that is no certificate) keeps the last good one and is reported with its field.
#[tokio::test]
async fn external_services_are_watched_and_a_bad_one_keeps_the_last_good_version() {
    let server = smi_api_server().await;
    let store = server.store();
    let externals = smi_type(Kind::ExternalService);
    let external = |host: &str, ca_bundle: Option<&str>| {
        let mut spec = json!({"hosts": [host],
                              "ports": [{"port": 80, "protocol": "http", "originateTls": {"port": 443}}],
                              "sources": [{"kind": "ServiceAccount", "name": "checkout"}]});
        if let Some(bundle) = ca_bundle {
            spec["caBundle"] = json!(bundle);
        }
        json!({"apiVersion": "policy.trellis.io/v1alpha1", "kind": "ExternalService",
               "metadata": {"name": "payments", "namespace": "shop"}, "spec": spec})
    };
    let hosts = |set: &PolicySet| -> Vec<String> {
        set.policies
            .iter()
            .filter_map(|p| match p {
                Policy::ExternalService(e) => Some(e.hosts.join(",")),
                _ => None,
            })
            .collect()
    };
    store
        .apply(&externals, external("api.pay.example", None))
        .unwrap();
    let mut sets = KubernetesPolicySource::new(kube_client(&server)).watch();
    let set = wait_for(&mut sets, "the ExternalService", |s| {
        hosts(s) == ["api.pay.example"]
    })
    .await;
    let id = ResourceId {
        kind: "ExternalService".into(),
        namespace: "shop".into(),
        name: "payments".into(),
    };
    assert_eq!(
        set.origins.get(&id).map(|o| &**o),
        Some("kubernetes ExternalService shop/payments")
    );

    store
        .apply(
            &externals,
            external("api2.pay.example", Some("not a certificate")),
        )
        .unwrap();
    let set = wait_for(&mut sets, "a problem", |s| !s.problems.is_empty()).await;
    assert_eq!(
        hosts(&set),
        ["api.pay.example"],
        "the last good version stays"
    );
    assert_eq!(set.problems.len(), 1, "{:?}", set.problems);
    let problem = &set.problems[0];
    assert_eq!(problem.resource, "ExternalService shop/payments");
    assert_eq!(problem.location, "kubernetes ExternalService shop/payments");
    assert_eq!(
        problem.message,
        "spec.caBundle: holds no PEM certificate (expected -----BEGIN CERTIFICATE----- blocks); the previous version stays in force"
    );
}
