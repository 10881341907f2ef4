//! The proxy in controller mode against a test controller implementing `trellis-proxy-api` on
//! loopback: on-demand destination watches, "does not exist" answers, endpoint deltas, inbound
//! policy, and a controller restart without a failed request.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use http::StatusCode;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};
use trellis_proxy::config::{Config, Inbound};
use trellis_proxy::controller::{Controller, ControllerOptions};
use trellis_proxy::{ProxyOptions, RunningProxy};
use trellis_proxy_api::v1::{self, destinations_server, inbound_server};

/// What the test controller serves; survives controller restarts.
#[derive(Debug, Default)]
struct State {
    destinations: Mutex<HashMap<String, watch::Sender<v1::DestinationUpdate>>>,
    policy: Mutex<Option<watch::Sender<v1::InboundPolicy>>>,
}

impl State {
    fn sender(&self, key: &str) -> watch::Sender<v1::DestinationUpdate> {
        let mut map = self.destinations.lock().unwrap();
        map.entry(key.to_string())
            .or_insert_with(|| {
                watch::channel(v1::DestinationUpdate {
                    version: "0".into(),
                    kind: Some(v1::destination_update::Kind::NotFound(v1::NotFound {
                        egress_denied: false,
                        external_ports: Vec::new(),
                        reason: format!("no service {key}"),
                    })),
                })
                .0
            })
            .clone()
    }

    fn set(&self, key: &str, version: &str, kind: v1::destination_update::Kind) {
        self.sender(key).send_replace(v1::DestinationUpdate {
            version: version.into(),
            kind: Some(kind),
        });
    }

    fn policy(&self) -> watch::Sender<v1::InboundPolicy> {
        self.policy
            .lock()
            .unwrap()
            .get_or_insert_with(|| {
                watch::channel(v1::InboundPolicy {
                    version: "0".into(),
                    default_action: v1::DefaultAction::Deny as i32,
                    ..Default::default()
                })
                .0
            })
            .clone()
    }
}

#[derive(Debug, Clone)]
struct Svc(Arc<State>);

#[tonic::async_trait]
impl destinations_server::Destinations for Svc {
    type WatchStream = futures::stream::BoxStream<'static, Result<v1::DestinationUpdate, Status>>;
    async fn watch(
        &self,
        req: Request<v1::DestinationRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let key = trellis_proxy_api::authority::normalize(&req.get_ref().target)
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .key();
        let rx = self.0.sender(&key).subscribe();
        Ok(Response::new(WatchStream::new(rx).map(Ok).boxed()))
    }
}

#[tonic::async_trait]
impl inbound_server::Inbound for Svc {
    type WatchStream = futures::stream::BoxStream<'static, Result<v1::InboundPolicy, Status>>;
    async fn watch(
        &self,
        _req: Request<v1::InboundRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Ok(Response::new(
            WatchStream::new(self.0.policy().subscribe())
                .map(Ok)
                .boxed(),
        ))
    }
}

/// A controller on its own runtime, so killing it drops every socket at once.
struct ControllerProcess {
    runtime: Option<tokio::runtime::Runtime>,
}

impl ControllerProcess {
    fn start(state: Arc<State>, addr: SocketAddr) -> (ControllerProcess, SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match std::net::TcpListener::bind(addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("rebinding {addr}: {e}"),
            }
        };
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            tonic::transport::Server::builder()
                .add_service(destinations_server::DestinationsServer::new(Svc(
                    state.clone()
                )))
                .add_service(inbound_server::InboundServer::new(Svc(state)))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        (
            ControllerProcess {
                runtime: Some(runtime),
            },
            addr,
        )
    }

    fn kill(mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn profile(backends: &[(&str, u32, &[SocketAddr])]) -> v1::destination_update::Kind {
    v1::destination_update::Kind::Profile(v1::DestinationProfile {
        authority: "echo.default".into(),
        protocol: v1::Protocol::Http as i32,
        balancer: v1::Balancer::RoundRobin as i32,
        backends: backends
            .iter()
            .map(|(name, weight, addrs)| v1::Backend {
                name: name.to_string(),
                weight: *weight,
                endpoints: addrs
                    .iter()
                    .map(|a| v1::Endpoint {
                        address: a.to_string(),
                        ..Default::default()
                    })
                    .collect(),
                workload: None,
            })
            .collect(),
        ..Default::default()
    })
}

async fn proxy_with_controller(
    controller: SocketAddr,
    inbound_app: Option<SocketAddr>,
) -> (RunningProxy, Arc<Controller>) {
    let mut base = Config::default();
    base.outbound.http = Some("127.0.0.1:0".parse().unwrap());
    if let Some(app) = inbound_app {
        base.inbound = Some(Inbound {
            listen: "127.0.0.1:0".parse().unwrap(),
            app,
            protocol: Default::default(),
            policy: Default::default(),
        });
    }
    let mut options = ControllerOptions::new(format!("http://{controller}"), "shop/client");
    options.min_backoff = Duration::from_millis(20);
    options.max_backoff = Duration::from_millis(200);
    let ctl = Controller::new(options, base).unwrap();
    let mut proxy_options = ProxyOptions::new(ctl.initial_config());
    proxy_options.resolver = Some(ctl.clone());
    let proxy = trellis_proxy::start(proxy_options).await.unwrap();
    ctl.attach(&proxy.shared, proxy.inbound.map(|a| a.port()));
    (proxy, ctl)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_restart_fails_no_request_and_updates_resume() {
    let v1 = app("v1").await;
    let v2 = app("v2").await;
    let state = Arc::new(State::default());
    state.set(
        "echo.default",
        "1",
        profile(&[("v1", 1, &[v1.addr]), ("v2", 0, &[v2.addr])]),
    );
    let (controller, ctl_addr) =
        ControllerProcess::start(state.clone(), "127.0.0.1:0".parse().unwrap());
    let (proxy, _ctl) = proxy_with_controller(ctl_addr, None).await;
    let addr = proxy.http.unwrap();

    let mut client = H1::connect(addr).await;
    assert_eq!(
        client.get("echo.default.svc.cluster.local", "/").await.1,
        "v1",
        "watched on first use"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let stop_load = stop.clone();
    let load = tokio::spawn(async move {
        let mut answers: HashMap<(StatusCode, String), usize> = HashMap::new();
        while !stop_load.load(Ordering::SeqCst) {
            let (status, app, _) = client.get("echo.default", "/").await;
            *answers.entry((status, app)).or_default() += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        answers
    });

    controller.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The controller changes the split while the proxy cannot hear it.
    state.set(
        "echo.default",
        "2",
        profile(&[("v1", 0, &[v1.addr]), ("v2", 1, &[v2.addr])]),
    );
    let v2_before = v2.hits();
    assert_eq!(v2_before, 0, "old config kept while the controller is away");
    let (_controller, _) = ControllerProcess::start(state.clone(), ctl_addr);

    let deadline = Instant::now() + Duration::from_secs(10);
    while v2.hits() == 0 {
        assert!(
            Instant::now() < deadline,
            "update not applied after the controller came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::SeqCst);
    let answers = load.await.unwrap();
    let failed: usize = answers
        .iter()
        .filter(|((s, _), _)| *s != StatusCode::OK)
        .map(|(_, n)| n)
        .sum();
    assert_eq!(failed, 0, "{answers:?}");
    assert!(
        answers
            .get(&(StatusCode::OK, "v1".into()))
            .is_some_and(|n| *n > 10),
        "{answers:?}"
    );
    assert!(
        answers.contains_key(&(StatusCode::OK, "v2".into())),
        "{answers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found_deltas_and_inbound_policy_come_from_the_controller() {
    let a = app("a").await;
    let b = app("b").await;
    let local = app("local").await;
    let state = Arc::new(State::default());
    state.set(
        "echo.default",
        "1",
        profile(&[("web", 1, &[a.addr, b.addr])]),
    );
    let (_controller, ctl_addr) =
        ControllerProcess::start(state.clone(), "127.0.0.1:0".parse().unwrap());
    let (proxy, _ctl) = proxy_with_controller(ctl_addr, Some(local.addr)).await;

    // "Does not exist" is an answer: a prompt 502, not a hang.
    let mut client = H1::connect(proxy.http.unwrap()).await;
    let started = Instant::now();
    let (status, reason, _) = client.get("ghost.default", "/").await;
    assert_eq!(
        (status, reason.as_str()),
        (StatusCode::BAD_GATEWAY, "unknown-destination")
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    // Endpoint delta: `a` goes away under load, no request fails, in-flight ones finish.
    assert_eq!(client.get("echo.default", "/").await.0, StatusCode::OK);
    let addr = proxy.http.unwrap();
    let slow =
        tokio::spawn(async move { H1::connect(addr).await.get("echo.default", "/slow").await.0 });
    let load = tokio::spawn(async move {
        let mut statuses = Vec::new();
        for _ in 0..100 {
            statuses.push(client.get("echo.default", "/").await.0);
        }
        (statuses, client)
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    state.set(
        "echo.default",
        "2",
        v1::destination_update::Kind::Delta(v1::EndpointsDelta {
            backends: vec![v1::BackendDelta {
                backend: "web".into(),
                added: vec![],
                removed: vec![a.addr.to_string()],
            }],
        }),
    );
    let (statuses, mut client) = load.await.unwrap();
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(slow.await.unwrap(), StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let before = a.hits();
        for _ in 0..10 {
            assert_eq!(client.get("echo.default", "/").await.0, StatusCode::OK);
        }
        if a.hits() == before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "removed endpoint still receives requests"
        );
    }

    // Inbound: denied until the controller allows it.
    let mut inbound = H1::connect(proxy.inbound.unwrap()).await;
    assert_eq!(inbound.get("local", "/").await.1, "forbidden");
    state.policy().send_replace(v1::InboundPolicy {
        version: "1".into(),
        protocol: v1::Protocol::Http as i32,
        authorizations: vec![v1::Authorization {
            unauthenticated: true,
            ..Default::default()
        }],
        default_action: v1::DefaultAction::Deny as i32,
        ..Default::default()
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while inbound.get("local", "/").await.1 != "local" {
        assert!(Instant::now() < deadline, "inbound policy not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let config = proxy.shared.routes.table.load().config();
    assert_eq!(
        config.destinations.len(),
        1,
        "only the destinations this proxy used are held"
    );
}

/// `trellis-proxy --controller URL --workload NS/NAME --gateway FILE` as a process: the Gateway
/// document's routes reach services the controller resolves (`name.namespace:port`, asked on
/// demand); the file rewritten under traffic with a new path route is applied without a failed
/// request; a bad rewrite is logged with the file, line and field and not applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_process_reads_its_gateway_document_resolves_through_the_controller_and_reloads()
{
    use common::gateway::{get, server_cert};
    const BIN: &str = env!("CARGO_BIN_EXE_trellis-proxy");
    let state = Arc::new(State::default());
    let (web, api) = (app("web").await, app("api").await);
    state.set("web.shop", "1", profile(&[("web", 1, &[web.addr])]));
    state.set("api.backend", "1", profile(&[("api", 1, &[api.addr])]));
    let (_controller, controller) =
        ControllerProcess::start(Arc::clone(&state), "127.0.0.1:0".parse().unwrap());

    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(common::certs::new_ca("public"));
    let (cert, key) = server_cert(&ca, &["shop.example.com"]);
    std::fs::write(dir.path().join("shop.crt"), cert).unwrap();
    std::fs::write(dir.path().join("shop.key"), key).unwrap();
    let (admin, https) = (free_port(), free_port());
    let document = |routes: &str| {
        format!(
            "apiVersion: policy.trellis.io/v1alpha1
kind: Gateway
metadata: {{name: public, namespace: shop}}
spec:
  https: {{port: {https}, address: 127.0.0.1}}
  certificates:
    - hosts: [shop.example.com]
      certFile: shop.crt
      keyFile: shop.key
  routes:
    - host: shop.example.com
      service: {{name: web, port: 8080}}
{routes}"
        )
    };
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, document("")).unwrap();
    // Each version replaces the file whole (as a ConfigMap update does), so the proxy never
    // reads half a version.
    let replace = |path: &std::path::Path, text: &str| {
        let next = path.with_extension("next");
        std::fs::write(&next, text)?;
        std::fs::rename(next, path)
    };
    let log = dir.path().join("proxy.log");
    let mut child = std::process::Command::new(BIN)
        .args(["--controller", &format!("http://{controller}")])
        .args(["--workload", "shop/gateway", "--threads", "1"])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .args(["--gateway", path.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let https: SocketAddr = format!("127.0.0.1:{https}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(https).await.is_err() {
        assert!(Instant::now() < deadline, "the gateway did not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        get(&ca, https, "shop.example.com", "/").await.1,
        "web",
        "resolved through the controller"
    );
    // No route for /api yet: the host's `/` route serves it.
    assert_eq!(get(&ca, https, "shop.example.com", "/api/x").await.1, "web");

    // Traffic all along: every request must succeed, through both rewrites.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (stop, ca) = (Arc::clone(&stop), Arc::clone(&ca));
        tokio::spawn(async move {
            let mut sent = 0;
            while !stop.load(Ordering::SeqCst) {
                let (status, app, _) = get(&ca, https, "shop.example.com", "/").await;
                assert_eq!((status, app.as_str()), (StatusCode::OK, "web"));
                sent += 1;
            }
            sent
        })
    };

    replace(
        &path,
        &document(
            "    - host: shop.example.com
      pathPrefix: /api
      service: {name: api, namespace: backend, port: 9090}
",
        ),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&ca, https, "shop.example.com", "/api/x").await.1 != "api" {
        assert!(Instant::now() < deadline, "the new route was not applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A bad version (a path prefix without its slash, line 14): refused, the last good routes
    // keep serving.
    replace(
        &path,
        &document(
            "    - host: shop.example.com
      pathPrefix: api
      service: {name: api, namespace: backend, port: 9090}
",
        ),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let refusal = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if let Some(line) = text.lines().find(|l| l.contains("gateway reload rejected")) {
            break line.to_string();
        }
        assert!(Instant::now() < deadline, "no refusal logged: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        refusal.contains("gateway.yaml:14: Gateway shop/public: spec.routes[1].pathPrefix"),
        "{refusal}"
    );
    assert_eq!(get(&ca, https, "shop.example.com", "/api/x").await.1, "api");
    assert_eq!(get(&ca, https, "shop.example.com", "/").await.1, "web");
    // Both outcomes counted, so an alert can catch a gateway that stopped taking its document.
    let (_, _, metrics) = H1::connect(format!("127.0.0.1:{admin}").parse().unwrap())
        .await
        .get("admin", "/metrics")
        .await;
    for result in ["applied", "rejected"] {
        let series =
            format!("trellis_config_updates_total{{source=\"gateway\",result=\"{result}\"}} ");
        let count: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series}in:\n{metrics}"));
        assert!(count >= 1, "{series}{count}");
    }

    stop.store(true, Ordering::SeqCst);
    let sent = traffic
        .await
        .expect("no request failed during the rewrites");
    assert!(sent > 0);
    assert!(api.hits() >= 2 && web.hits() >= sent);
    child.kill().unwrap();
    child.wait().unwrap();
}
