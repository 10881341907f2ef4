//! The controller end to end on loopback: the file platform and a watched policy directory, the
//! real gRPC server read by a real tonic client, and a real trellis-proxy in front of two echo
//! apps moving traffic when the TrafficSplit file is edited.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use trellis_controller::discovery::Platform;
use trellis_controller::run::{Options, Running, start};
use trellis_controller_core::index::IndexOptions;
use trellis_echo::client::{CallPlan, run};
use trellis_echo::echo::{EchoServer, Identity};
use trellis_proxy_api::v1::{
    self, destinations_client::DestinationsClient, inbound_client::InboundClient,
};

fn services(v1: SocketAddr, v2: SocketAddr) -> String {
    format!(
        "namespace: demo
services:
  - name: web
    ports: [{{ name: http, port: 8080, protocol: http }}]
    endpoints:
      - {{ address: {}, port: {}, labels: {{ version: v1 }} }}
      - {{ address: {}, port: {}, labels: {{ version: v2 }} }}
  - name: api
    ports: [{{ name: http, port: 8090, protocol: http }}]
    endpoints:
      - {{ address: 127.0.0.9, port: 9 }}
",
        v1.ip(),
        v1.port(),
        v2.ip(),
        v2.port()
    )
}

fn split(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {{ name: web, namespace: demo }}
spec:
  service: web
  backends:
  - {{ service: web-v1, weight: {v1} }}
  - {{ service: web-v2, weight: {v2} }}
"
    )
}

const TARGET: &str = "apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: { name: client-to-web, namespace: demo }
spec:
  destination: { kind: ServiceAccount, name: web, namespace: demo }
  sources:
  - { kind: ServiceAccount, name: client, namespace: demo }
  rules:
  - { kind: TCPRoute, name: web-port }
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: { name: web-port, namespace: demo }
spec:
  matches:
    ports: [8080]
";

/// Writes `text` so the change is seen even on coarse mtimes (write to a temp file, rename).
fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn controller(dir: &Path, v1: SocketAddr, v2: SocketAddr) -> Running {
    let mesh = dir.join("mesh.yaml");
    std::fs::write(&mesh, services(v1, v2)).unwrap();
    let policy = dir.join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    write(&policy.join("split.yaml"), &split(1, 0));
    std::fs::write(policy.join("target.yaml"), TARGET).unwrap();
    start(Options {
        policy_paths: vec![policy],
        platforms: vec![Platform::File(mesh)],
        adapters: Default::default(),
        webhooks: None,
        traffic_metrics: None,
        grpc: "127.0.0.1:0".parse().unwrap(),
        admin: Some("127.0.0.1:0".parse().unwrap()),
        index: IndexOptions::default(),
    })
    .await
    .unwrap()
}

fn weights(update: &v1::DestinationUpdate) -> Vec<(String, u32, usize)> {
    match &update.kind {
        Some(v1::destination_update::Kind::Profile(p)) => p
            .backends
            .iter()
            .map(|b| (b.name.clone(), b.weight, b.endpoints.len()))
            .collect(),
        other => panic!("expected a profile, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tonic_client_gets_complete_answers_then_updates() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b): (SocketAddr, SocketAddr) = (
        "127.0.0.1:1001".parse().unwrap(),
        "127.0.0.1:1002".parse().unwrap(),
    );
    let ctl = controller(dir.path(), a, b).await;
    let url = format!("http://{}", ctl.grpc);

    let mut client = DestinationsClient::connect(url.clone()).await.unwrap();
    let mut stream = client
        .watch(v1::DestinationRequest {
            target: "web.demo.svc.cluster.local:8080".into(),
            source_workload: "demo/client".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        weights(&first),
        vec![("web-v1".into(), 1, 1), ("web-v2".into(), 0, 1)]
    );
    if let Some(v1::destination_update::Kind::Profile(p)) = &first.kind {
        assert_eq!(p.backends[0].endpoints[0].address, "127.0.0.1:1001");
        assert_eq!(
            p.backends[0].endpoints[0].identity,
            "spiffe://cluster.local/ns/demo/sa/web"
        );
    }

    write(&dir.path().join("policy/split.yaml"), &split(0, 1));
    let next = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        weights(&next),
        vec![("web-v1".into(), 0, 1), ("web-v2".into(), 1, 1)]
    );
    assert_ne!(first.version, next.version);

    // A service no platform knows: "does not exist" is an answer.
    let mut missing = client
        .watch(v1::DestinationRequest {
            target: "nope.demo".into(),
            source_workload: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let answer = tokio::time::timeout(Duration::from_secs(10), missing.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            answer.kind,
            Some(v1::destination_update::Kind::NotFound(v1::NotFound {
                egress_denied: false,
                ..
            }))
        ),
        "{answer:?}"
    );

    // Inbound: the TrafficTarget allows demo/client on 8080; another port is default deny.
    let mut inbound = InboundClient::connect(url).await.unwrap();
    let mut on_8080 = inbound
        .watch(v1::InboundRequest {
            workload: "demo/web".into(),
            port: 8080,
        })
        .await
        .unwrap()
        .into_inner();
    let policy = on_8080.next().await.unwrap().unwrap();
    assert_eq!(policy.default_action, v1::DefaultAction::Deny as i32);
    assert_eq!(policy.authorizations.len(), 1);
    assert_eq!(
        policy.authorizations[0].identities,
        vec!["spiffe://cluster.local/ns/demo/sa/client"]
    );
    assert_eq!(policy.authorizations[0].ports, vec![8080]);
    let other = inbound
        .watch(v1::InboundRequest {
            workload: "demo/web".into(),
            port: 9090,
        })
        .await
        .unwrap()
        .into_inner()
        .next()
        .await
        .unwrap()
        .unwrap();
    assert!(other.authorizations.is_empty());
    let bad = inbound
        .watch(v1::InboundRequest {
            workload: "no-slash".into(),
            port: 1,
        })
        .await;
    assert_eq!(bad.unwrap_err().code(), tonic::Code::InvalidArgument);

    // The admin state shows the streams, the split and no problems.
    let state = ctl.index.status().borrow().clone();
    assert!(state.problems.is_empty(), "{:?}", state.problems);
    assert!(
        state
            .policies
            .iter()
            .any(|p| p.kind == "TrafficSplit" && p.name == "web")
    );
}

async fn echo(version: &str) -> EchoServer {
    EchoServer::start(
        "127.0.0.1:0".parse().unwrap(),
        Identity {
            service: "web".into(),
            version: version.into(),
        },
    )
    .await
    .unwrap()
}

async fn count(proxy: SocketAddr, n: u32) -> std::collections::BTreeMap<String, u32> {
    let report = run(&CallPlan {
        url: "http://web.demo/".into(),
        count: n,
        method: "GET".into(),
        caller: Some("client".into()),
        headers: Default::default(),
        proxy: Some(proxy),
        timeout_ms: Some(5000),
        concurrency: None,
    })
    .await
    .unwrap();
    report.by_responder
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_proxy_moves_exactly_all_requests_when_the_split_file_changes() {
    let v1 = echo("v1").await;
    let v2 = echo("v2").await;
    let dir = tempfile::tempdir().unwrap();
    let ctl = controller(dir.path(), v1.addr(), v2.addr()).await;

    let mut base = trellis_proxy::config::Config::default();
    base.outbound.http = Some("127.0.0.1:0".parse().unwrap());
    let options = trellis_proxy::controller::ControllerOptions::new(
        format!("http://{}", ctl.grpc),
        "demo/client",
    );
    let client = trellis_proxy::controller::Controller::new(options, base).unwrap();
    let mut proxy_options = trellis_proxy::ProxyOptions::new(client.initial_config());
    proxy_options.resolver = Some(client.clone());
    let proxy = trellis_proxy::start(proxy_options).await.unwrap();
    client.attach(&proxy.shared, None);
    let addr = proxy.http.unwrap();

    let all_v1 = count(addr, 50).await;
    assert_eq!(
        all_v1.get("web/v1"),
        Some(&50),
        "1:0 sends all 50 to v1: {all_v1:?}"
    );

    write(&dir.path().join("policy/split.yaml"), &split(0, 1));
    let changed = Instant::now();
    loop {
        let seen = count(addr, 1).await;
        if seen.get("web/v2") == Some(&1) {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(5),
            "not applied within 5 s: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all_v2 = count(addr, 50).await;
    assert_eq!(
        all_v2.get("web/v2"),
        Some(&50),
        "0:1 sends all 50 to v2: {all_v2:?}"
    );
    assert_eq!(all_v2.get("web/v1"), None);
    proxy.drain(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_change_sends_nothing_to_destinations_it_does_not_touch() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b): (SocketAddr, SocketAddr) = (
        "127.0.0.1:1001".parse().unwrap(),
        "127.0.0.1:1002".parse().unwrap(),
    );
    let ctl = controller(dir.path(), a, b).await;
    let service = |name: &str| trellis_discovery::ServiceKey::new("demo", name);
    let mut web = ctl.index.destination(service("web")).await.unwrap();
    let mut api = ctl.index.destination(service("api")).await.unwrap();
    let ready = |u: &Option<v1::DestinationUpdate>| u.is_some();
    tokio::time::timeout(Duration::from_secs(10), web.wait_for(ready))
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), api.wait_for(ready))
        .await
        .unwrap()
        .unwrap();
    let api_version = api.borrow_and_update().as_ref().unwrap().version.clone();
    let web_version = web.borrow_and_update().as_ref().unwrap().version.clone();

    write(&dir.path().join("policy/split.yaml"), &split(1, 1));
    tokio::time::timeout(Duration::from_secs(5), web.changed())
        .await
        .unwrap()
        .unwrap();
    assert_ne!(web.borrow().as_ref().unwrap().version, web_version);
    // Give the index time to (wrongly) touch api, then check it did not.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !api.has_changed().unwrap(),
        "api was not touched by the web split change"
    );
    assert_eq!(api.borrow().as_ref().unwrap().version, api_version);
}

/// `--egress deny` reaches proxies with every not-found answer: an address the mesh does not
/// know is answered "not found, egress denied" (the proxy then refuses the connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_egress_switch_is_said_with_not_found_answers() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        services(
            "127.0.0.1:1001".parse().unwrap(),
            "127.0.0.1:1002".parse().unwrap(),
        ),
    )
    .unwrap();
    let ctl = start(Options {
        policy_paths: vec![],
        platforms: vec![Platform::File(mesh)],
        adapters: Default::default(),
        webhooks: None,
        traffic_metrics: None,
        grpc: "127.0.0.1:0".parse().unwrap(),
        admin: None,
        index: IndexOptions {
            egress_denied: true,
            ..IndexOptions::default()
        },
    })
    .await
    .unwrap();
    let mut client = DestinationsClient::connect(format!("http://{}", ctl.grpc))
        .await
        .unwrap();
    for target in ["203.0.113.7:443", "nope.demo"] {
        let mut stream = client
            .watch(v1::DestinationRequest {
                target: target.into(),
                source_workload: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let answer = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            matches!(
                answer.kind,
                Some(v1::destination_update::Kind::NotFound(v1::NotFound {
                    egress_denied: true,
                    ..
                }))
            ),
            "{target}: {answer:?}"
        );
    }
}

fn payments(ports: &str) -> String {
    format!(
        "apiVersion: policy.trellis.io/v1alpha1
kind: ExternalService
metadata: {{ name: payments, namespace: shop }}
spec:
  hosts: [api.pay.example]
  ports:
{ports}  - {{ port: 5432, protocol: tcp }}
  addresses: [203.0.113.9]
  sources:
  - {{ kind: ServiceAccount, name: checkout }}
"
    )
}

async fn next_update(
    stream: &mut tonic::Streaming<v1::DestinationUpdate>,
    target: &str,
) -> v1::DestinationUpdate {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap_or_else(|_| panic!("{target}: no answer in 10 s"))
        .unwrap()
        .unwrap()
}

/// An ExternalService in the policy directory of the file platform, through the real gRPC API:
/// its `host:port` (in any spelling) and its fixed address on a port get the external profile,
/// an address the mesh does not know gets "not found" with the declared ports (not the tcp one),
/// and an open "not found" watch is sent the new ports when the ExternalService changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_service_is_served_by_host_and_its_ports_come_with_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        services(
            "127.0.0.1:1001".parse().unwrap(),
            "127.0.0.1:1002".parse().unwrap(),
        ),
    )
    .unwrap();
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    let file = policy.join("payments.yaml");
    write(
        &file,
        &payments(
            "  - { port: 443, protocol: tls }\n  - { port: 80, protocol: http, originateTls: { port: 443 } }\n",
        ),
    );
    let ctl = start(Options {
        policy_paths: vec![policy],
        platforms: vec![Platform::File(mesh)],
        adapters: Default::default(),
        webhooks: None,
        traffic_metrics: None,
        grpc: "127.0.0.1:0".parse().unwrap(),
        admin: None,
        index: IndexOptions::default(),
    })
    .await
    .unwrap();
    let client = DestinationsClient::connect(format!("http://{}", ctl.grpc))
        .await
        .unwrap();
    let watch = |target: &'static str| {
        let mut client = client.clone();
        async move {
            client
                .watch(v1::DestinationRequest {
                    target: target.into(),
                    source_workload: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
        }
    };

    // The host is one destination whatever the port asked, as a mesh service is (the proxy
    // asks by host; any spelling).
    for target in [
        "api.pay.example:443",
        "API.Pay.Example.:443",
        "api.pay.example",
        "api.pay.example:80",
    ] {
        let mut stream = watch(target).await;
        let answer = next_update(&mut stream, target).await;
        let Some(v1::destination_update::Kind::Profile(profile)) = answer.kind else {
            panic!("{target}: expected a profile, got {answer:?}");
        };
        assert_eq!(profile.authority, "api.pay.example");
        assert_eq!(profile.protocol, v1::Protocol::Detect as i32);
        assert_eq!(
            profile.backends[0].endpoints[0].address, "203.0.113.9",
            "the fixed address, not DNS; the port is the call's"
        );
        assert_eq!(
            profile.external,
            Some(v1::ExternalService {
                name: "shop/payments".into(),
                allowed_identities: vec!["spiffe://cluster.local/ns/shop/sa/checkout".into()],
                ports: vec![
                    v1::ExternalPort {
                        port: 80,
                        originate_tls_port: 443,
                    },
                    v1::ExternalPort {
                        port: 443,
                        originate_tls_port: 0,
                    },
                    v1::ExternalPort {
                        port: 5432,
                        originate_tls_port: 0,
                    },
                ],
                ca_bundle: String::new(),
            }),
            "{target}"
        );
    }

    // A transparent connection to the fixed address on the tcp port: the ExternalService.
    let mut by_address = watch("203.0.113.9:5432").await;
    let answer = next_update(&mut by_address, "203.0.113.9:5432").await;
    let Some(v1::destination_update::Kind::Profile(profile)) = answer.kind else {
        panic!("expected a profile, got {answer:?}");
    };
    assert_eq!(profile.authority, "203.0.113.9:5432");
    assert_eq!(
        profile.protocol,
        v1::Protocol::Tcp as i32,
        "that port's protocol"
    );
    assert_eq!(profile.external.unwrap().name, "shop/payments");

    // An address the mesh does not know, and a host nobody declares: not found, with the ports.
    let mut unknown = watch("203.0.113.7:443").await;
    let mut undeclared = watch("www.other.example:443").await;
    for (target, stream) in [
        ("203.0.113.7:443", &mut unknown),
        ("www.other.example:443", &mut undeclared),
    ] {
        let answer = next_update(stream, target).await;
        let Some(v1::destination_update::Kind::NotFound(nf)) = answer.kind else {
            panic!("{target}: expected not found, got {answer:?}");
        };
        assert_eq!(nf.external_ports, [80, 443], "{target}");
    }

    // A new port declared: the open "not found" watch is told, without asking again.
    write(
        &file,
        &payments(
            "  - { port: 443, protocol: tls }\n  - { port: 80, protocol: http, originateTls: { port: 443 } }\n  - { port: 8443, protocol: tls }\n",
        ),
    );
    let answer = next_update(&mut unknown, "203.0.113.7:443 after the change").await;
    let Some(v1::destination_update::Kind::NotFound(nf)) = answer.kind else {
        panic!("expected not found, got {answer:?}");
    };
    assert_eq!(nf.external_ports, [80, 443, 8443]);
    let mut new_port = watch("api.pay.example:8443").await;
    let answer = next_update(&mut new_port, "api.pay.example:8443").await;
    assert!(
        matches!(answer.kind, Some(v1::destination_update::Kind::Profile(_))),
        "{answer:?}"
    );
}
