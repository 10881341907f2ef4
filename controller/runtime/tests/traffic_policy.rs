//! A TrafficPolicy end to end: a document in the watched policy directory reaches a tonic
//! client of the real gRPC server as typed fields (destination profile and inbound policy), and
//! the real proxy's mapping turns them into its configuration; the same YAML as a CRD object on
//! the fake Kubernetes API server (the Kubernetes policy source) gives the same answers.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use trellis_controller::discovery::Platform;
use trellis_controller::run::{Options, Running, start, start_with};
use trellis_controller_core::index::IndexOptions;
use trellis_proxy_api::v1::{
    self, destinations_client::DestinationsClient, inbound_client::InboundClient,
};

const MESH: &str = "namespace: demo
services:
  - name: web
    ports: [{ name: http, port: 8080, protocol: http }]
    endpoints:
      - { address: 127.0.0.1, port: 1001 }
  - name: web-shadow
    ports: [{ name: http, port: 8080, protocol: http }]
    endpoints:
      - { address: 127.0.0.1, port: 1003 }
";

const POLICY: &str = "apiVersion: policy.trellis.io/v1alpha1
kind: TrafficPolicy
metadata: { name: web, namespace: demo }
spec:
  targetRef: { kind: Service, name: web }
  timeouts: { request: 2s, perTry: 500ms }
  retries: { attempts: 2, statusCodes: [429] }
  circuitBreaker: { maxConnections: 50 }
  rateLimit: { requestsPerSecond: 100, burst: 150 }
  mirror: { backend: web-shadow, percent: 10 }
  loadBalancer: roundRobin
  routes:
  - httpRouteGroup: web-routes
    matches: [api]
    timeouts: { request: 10s }
    rateLimit: { requestsPerSecond: 5 }
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: { name: web-routes, namespace: demo }
spec:
  matches:
  - { name: api, pathRegex: '/api/.*' }
  - { name: static, pathRegex: '/static/.*' }
";

fn options(dir: &Path, policy_paths: Vec<std::path::PathBuf>) -> Options {
    let mesh = dir.join("mesh.yaml");
    std::fs::write(&mesh, MESH).unwrap();
    Options {
        policy_paths,
        platforms: vec![Platform::File(mesh)],
        adapters: Default::default(),
        webhooks: None,
        traffic_metrics: None,
        grpc: "127.0.0.1:0".parse().unwrap(),
        admin: None,
        index: IndexOptions::default(),
    }
}

/// The first profile of `web.demo` and the first inbound policy of demo/web on 1001 (the port
/// its endpoint serves web on) that carries rate limits.
async fn answers(ctl: &Running) -> (v1::DestinationProfile, v1::InboundPolicy) {
    let url = format!("http://{}", ctl.grpc);
    let mut destinations = DestinationsClient::connect(url.clone()).await.unwrap();
    let mut stream = destinations
        .watch(v1::DestinationRequest {
            target: "web.demo.svc.cluster.local:8080".into(),
            source_workload: "demo/client".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let profile = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let update = stream.next().await.unwrap().unwrap();
            if let Some(v1::destination_update::Kind::Profile(p)) = update.kind
                && p.policy.is_some()
            {
                return p;
            }
        }
    })
    .await
    .expect("a profile with the policy within 10 s");
    let mut inbound = InboundClient::connect(url).await.unwrap();
    let mut stream = inbound
        .watch(v1::InboundRequest {
            workload: "demo/web".into(),
            port: 1001,
        })
        .await
        .unwrap()
        .into_inner();
    let policy = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let policy = stream.next().await.unwrap().unwrap();
            if !policy.rate_limits.is_empty() {
                return policy;
            }
        }
    })
    .await
    .expect("an inbound policy with the rate limits within 10 s");
    (profile, policy)
}

fn seconds(d: &Option<prost_types::Duration>) -> f64 {
    let d = d.as_ref().expect("a duration");
    d.seconds as f64 + f64::from(d.nanos) / 1e9
}

/// What the policy directory's TrafficPolicy must give, as the proxy receives it.
fn check(profile: &v1::DestinationProfile, inbound: &v1::InboundPolicy) {
    assert_eq!(profile.balancer, v1::Balancer::RoundRobin as i32);
    let policy = profile.policy.as_ref().unwrap();
    let timeouts = policy.timeouts.as_ref().unwrap();
    assert_eq!(seconds(&timeouts.request), 2.0);
    assert_eq!(seconds(&timeouts.per_try), 0.5);
    let retries = policy.retries.as_ref().unwrap();
    assert_eq!(
        (retries.attempts, retries.status_codes.clone()),
        (2, vec![429])
    );
    assert_eq!(
        policy.circuit_breaker.as_ref().unwrap().max_connections,
        Some(50)
    );
    let mirror = policy.mirror.as_ref().unwrap();
    assert_eq!(
        (mirror.backend.as_str(), mirror.percent),
        ("web-shadow", 10.0)
    );
    // The mirror's service is a backend that gets no share, with its endpoints.
    let backends: Vec<(&str, u32, Vec<&str>)> = profile
        .backends
        .iter()
        .map(|b| {
            let eps = b.endpoints.iter().map(|e| e.address.as_str()).collect();
            (b.name.as_str(), b.weight, eps)
        })
        .collect();
    assert_eq!(
        backends,
        [
            ("web", 1, vec!["127.0.0.1:1001"]),
            ("web-shadow", 0, vec!["127.0.0.1:1003"]),
        ]
    );
    // The route section: its matches, the default backends, its own timeout.
    assert_eq!(profile.routes.len(), 1);
    let route = &profile.routes[0];
    assert_eq!(route.name, "web-routes:api");
    assert_eq!(route.matches.len(), 1);
    assert_eq!(route.matches[0].path_regex, "/api/.*");
    assert!(route.backends.is_empty());
    let route_policy = route.policy.as_ref().unwrap();
    assert_eq!(
        seconds(&route_policy.timeouts.as_ref().unwrap().request),
        10.0
    );
    assert!(route_policy.retries.is_none());
    // Rate limits: inbound, the route's first.
    let limits: Vec<(&str, usize, f64, u32)> = inbound
        .rate_limits
        .iter()
        .map(|l| {
            (
                l.name.as_str(),
                l.matches.len(),
                l.requests_per_second,
                l.burst,
            )
        })
        .collect();
    assert_eq!(
        limits,
        [
            ("demo/web/web-routes", 1, 5.0, 0),
            ("demo/web", 0, 100.0, 150),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traffic_policy_file_reaches_a_proxy_as_typed_fields() {
    let dir = tempfile::tempdir().unwrap();
    let policy_dir = dir.path().join("policy");
    std::fs::create_dir_all(&policy_dir).unwrap();
    std::fs::write(policy_dir.join("web.yaml"), POLICY).unwrap();
    let ctl = start(options(dir.path(), vec![policy_dir])).await.unwrap();
    let (profile, inbound) = answers(&ctl).await;
    check(&profile, &inbound);

    // The real proxy's mapping: the configuration it runs with holds the policy.
    let config = trellis_proxy::controller::destination_from_proto("web.demo", profile.clone());
    let policy = config.policy.expect("the destination's policy");
    assert_eq!(policy.timeouts.unwrap().request.unwrap().as_millis(), 2000);
    assert_eq!(
        policy.load_balancer,
        Some(trellis_policy::LoadBalancer::RoundRobin)
    );
    let route = config.routes[0]
        .policy
        .as_ref()
        .expect("the route's policy");
    assert_eq!(
        route
            .timeouts
            .as_ref()
            .unwrap()
            .request
            .unwrap()
            .as_millis(),
        10_000
    );
    let inbound_config = trellis_proxy::controller::policy_from_proto(inbound).unwrap();
    let limits: Vec<(String, f64)> = inbound_config
        .rate_limits
        .iter()
        .map(|l| (l.name.clone(), l.limit.requests_per_second))
        .collect();
    assert_eq!(
        limits,
        [
            ("demo/web/web-routes".into(), 5.0),
            ("demo/web".into(), 100.0)
        ]
    );
    let state = ctl.index.status().borrow().clone();
    assert!(state.problems.is_empty(), "{:?}", state.problems);
}

#[cfg(feature = "kubernetes")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_yaml_as_crd_objects_gives_the_same_answers() {
    use std::sync::Arc;
    use trellis_controller_kubernetes::policy::KubernetesPolicySource;
    use trellis_testing::{Kind, kube_client, smi_api_server, smi_type};

    // Through the policy directory...
    let dir = tempfile::tempdir().unwrap();
    let policy_dir = dir.path().join("policy");
    std::fs::create_dir_all(&policy_dir).unwrap();
    std::fs::write(policy_dir.join("web.yaml"), POLICY).unwrap();
    let from_files = start(options(dir.path(), vec![policy_dir])).await.unwrap();
    let (file_profile, file_inbound) = answers(&from_files).await;

    // ...and as objects of the fake API server, read by the Kubernetes policy source.
    let server = smi_api_server().await;
    for document in POLICY.split("\n---\n") {
        let object: serde_json::Value = serde_yaml_ng::from_str(document).unwrap();
        let kind = match object["kind"].as_str().unwrap() {
            "TrafficPolicy" => Kind::TrafficPolicy,
            _ => Kind::HttpRouteGroup,
        };
        server.store().apply(&smi_type(kind), object).unwrap();
    }
    let source = KubernetesPolicySource::new(kube_client(&server));
    let kube_dir = tempfile::tempdir().unwrap();
    let from_kubernetes = start_with(options(kube_dir.path(), vec![]), vec![Arc::new(source)])
        .await
        .unwrap();
    let (kube_profile, kube_inbound) = answers(&from_kubernetes).await;
    check(&kube_profile, &kube_inbound);
    assert_eq!(kube_profile, file_profile);
    assert_eq!(
        v1::InboundPolicy {
            version: String::new(),
            ..kube_inbound
        },
        v1::InboundPolicy {
            version: String::new(),
            ..file_inbound
        }
    );
    // The status is published on its own channel, after the answers: wait for it to show the
    // policy (on a busy machine it can lag the answers read above).
    let mut status = from_kubernetes.index.status();
    let state = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        status.wait_for(|state| {
            state
                .policies
                .iter()
                .any(|p| p.kind == "TrafficPolicy" && p.name == "web")
        }),
    )
    .await
    .expect("the status lists the TrafficPolicy within 10 s")
    .unwrap()
    .clone();
    assert!(state.problems.is_empty(), "{:?}", state.problems);
}
