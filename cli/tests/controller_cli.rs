//! `trellis controller` as a real process (file and consul-double platforms), read by
//! `trellis check` and `trellis get`, and `trellis demo --once` run headlessly.

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use futures::StreamExt;
use trellis_proxy_api::v1::{self, destinations_client::DestinationsClient};
use trellis_testing::{ControllerProcess, controller_command, http_get};

const TRELLIS: &str = env!("CARGO_BIN_EXE_trellis");

fn controller(args: &[&str]) -> ControllerProcess {
    ControllerProcess::start(TRELLIS, args)
}

#[cfg(feature = "kubernetes")]
fn controller_with_env(args: &[&str], env: &[(&str, &str)]) -> ControllerProcess {
    ControllerProcess::spawn(
        controller_command(TRELLIS)
            .envs(env.iter().copied())
            .args(args),
    )
}

fn trellis(args: &[&str]) -> Output {
    Command::new(TRELLIS).args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

const SPLIT: &str = "apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: { name: web, namespace: demo }
spec:
  service: web
  backends:
  - { service: web-v1, weight: 1 }
  - { service: web-v2, weight: 0 }
";

/// Runs `check` until `pred` holds on its output (the policy source answers within ~250 ms).
fn check_until(admin: SocketAddr, pred: impl Fn(&Output) -> bool) -> Output {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = trellis(&["check", "--admin", &admin.to_string()]);
        if pred(&out) || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn controller_on_the_file_platform_with_check_and_get() {
    let dir = tempfile::tempdir().unwrap();
    let services = trellis_adapter_file::write_demo(dir.path()).unwrap();
    let policy = dir.path().join("policy");
    std::fs::create_dir(&policy).unwrap();
    std::fs::write(policy.join("split.yaml"), SPLIT).unwrap();
    let ctl = controller(&[
        "--platform",
        &format!("file={}", services.display()),
        "--policy",
        policy.to_str().unwrap(),
    ]);
    let admin = ctl.admin.to_string();

    let out = check_until(ctl.admin, |o| stdout(o).contains("policies in force: 1"));
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(
        text.contains("controller: up") && text.contains("policy: ready"),
        "{text}"
    );
    assert!(
        text.contains("TrafficSplit demo/web: root web -> web-v1 1, web-v2 0"),
        "{text}"
    );
    assert!(text.contains("problems: 0"), "{text}");

    // A proxy-like client watches web.demo; `get services` shows the resolved split.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (first, _stream) = runtime.block_on(first_update(ctl.grpc, "web.demo"));
    assert!(
        matches!(first.kind, Some(v1::destination_update::Kind::Profile(_))),
        "{first:?}"
    );
    let services_out = trellis(&["get", "services", "--admin", &admin]);
    let table = stdout(&services_out);
    assert!(table.starts_with("DESTINATION"), "{table}");
    assert!(
        table.contains("web.demo") && table.contains("web-v1 1/1, web-v2 0/1"),
        "{table}"
    );
    let splits = stdout(&trellis(&["get", "splits", "--admin", &admin]));
    assert!(
        splits.contains("demo") && splits.contains("root web -> web-v1 1, web-v2 0"),
        "{splits}"
    );
    let check = check_until(ctl.admin, |o| {
        stdout(o).contains("proxy streams: 1 destination")
    });
    assert!(http_get(ctl.admin, "/live").unwrap().0.contains("200"));
    assert!(http_get(ctl.admin, "/ready").unwrap().0.contains("200"));
    assert!(http_get(ctl.admin, "/nope").unwrap().0.contains("404"));
    let (status, metrics) = http_get(ctl.admin, "/metrics").unwrap();
    assert!(status.contains("200"), "{status}");
    assert!(
        metrics.contains("trellis_controller_proxy_streams_destinations 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("trellis_controller_policies 1"),
        "{metrics}"
    );
    assert!(
        stdout(&check).contains("platform file:"),
        "{}",
        stdout(&check)
    );

    // A bad edit: reported with file:line, check fails, the last good split stays.
    std::fs::write(
        policy.join("split.yaml"),
        SPLIT.replace("weight: 0 }", "weight: -5 }"),
    )
    .unwrap();
    let out = check_until(ctl.admin, |o| o.status.code() == Some(1));
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("split.yaml:") && text.contains("last good"),
        "{text}"
    );
    assert!(text.contains("root web -> web-v1 1, web-v2 0"), "{text}");

    // The controller down: check says so and fails.
    drop(ctl);
    let out = trellis(&["check", "--admin", &admin]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("controller: DOWN"),
        "{}",
        stdout(&out)
    );
    let out = trellis(&["get", "splits", "--admin", &admin]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn controller_on_the_consul_double_answers_from_consul() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let double = runtime
        .block_on(trellis_consul_double::ConsulDouble::start())
        .unwrap();
    let ctl = controller(&["--platform", &format!("consul={}", double.addr())]);
    let (answer, _watch) = runtime.block_on(first_update(ctl.grpc, "web.default"));
    match answer.kind {
        Some(v1::destination_update::Kind::NotFound(n)) => {
            assert!(n.reason.contains("default/web"), "{n:?}")
        }
        other => panic!("expected not found from an empty Consul, got {other:?}"),
    }
    let out = check_until(ctl.admin, |o| stdout(o).contains("platform consul:"));
    assert!(
        stdout(&out).contains("platform consul:"),
        "{}",
        stdout(&out)
    );
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));

    // Consul goes away (every connection cut, new ones refused): check names the source, says
    // why, and fails; when it is back, check is clean again.
    double.stop();
    let out = check_until(ctl.admin, |o| stdout(o).contains("STALE"));
    let text = stdout(&out);
    let line = text
        .lines()
        .find(|l| l.starts_with("platform consul:"))
        .unwrap_or_default();
    assert!(line.contains("STALE: "), "{text}");
    assert_eq!(out.status.code(), Some(1), "{text}");
    runtime.block_on(double.restart()).unwrap();
    let out = check_until(ctl.admin, |o| o.status.code() == Some(0));
    assert!(!stdout(&out).contains("STALE"), "{}", stdout(&out));
}

/// A Destinations watch of `target` on the controller at `grpc`: its first update, and the
/// stream (kept open, the controller keeps watching the platform for it).
async fn first_update(
    grpc: SocketAddr,
    target: &str,
) -> (
    v1::DestinationUpdate,
    tonic::Streaming<v1::DestinationUpdate>,
) {
    let mut client = DestinationsClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let mut stream = client
        .watch(v1::DestinationRequest {
            target: target.into(),
            source_workload: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an update within 10 s")
        .expect("the stream stays open")
        .expect("an update, not an error");
    (first, stream)
}

#[test]
fn controller_reads_a_consul_with_acls_using_a_token_from_a_file() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let double = runtime
        .block_on(trellis_consul_double::ConsulDouble::start_with(
            trellis_consul_double::DoubleConfig {
                acl_token: Some("s3cret-token".into()),
                ..Default::default()
            },
        ))
        .unwrap();
    let registration = serde_json::from_value(serde_json::json!({
        "Node": "web-host", "Address": "10.2.0.7",
        "Service": {"ID": "web-1", "Service": "web", "Port": 15001,
                    "Meta": {"service-account": "web", "version": "v1"}},
        "Check": {"CheckID": "service:web-1", "Name": "ready", "Status": "passing", "ServiceID": "web-1"},
    }))
    .unwrap();
    double.register(&registration).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("consul.token");
    std::fs::write(&token, "s3cret-token\n").unwrap();

    // With the token (and Consul OSS's services mapped into the mesh namespace `shop`).
    let ctl = controller(&[
        "--platform",
        &format!(
            "consul={},token-file={},namespace=shop",
            double.addr(),
            token.display()
        ),
    ]);
    let (update, _watch) = runtime.block_on(first_update(ctl.grpc, "web.shop"));
    let Some(v1::destination_update::Kind::Profile(profile)) = update.kind else {
        panic!("expected web.shop's profile, got {update:?}");
    };
    let endpoints: Vec<&str> = profile
        .backends
        .iter()
        .flat_map(|b| b.endpoints.iter().map(|e| e.address.as_str()))
        .collect();
    assert_eq!(endpoints, ["10.2.0.7:15001"], "{profile:?}");
    drop(ctl);

    // Without it: Consul filters everything out; check says the source is stale and why.
    let ctl = controller(&["--platform", &format!("consul={}", double.addr())]);
    let (_, _watch) = runtime.block_on(first_update(ctl.grpc, "web.default"));
    let out = check_until(ctl.admin, |o| stdout(o).contains("STALE"));
    let text = stdout(&out);
    assert!(text.contains("STALE"), "{text}");
    assert!(text.to_lowercase().contains("acl"), "{text}");
    assert_eq!(out.status.code(), Some(1), "{text}");

    // A missing token file stops the start with the path.
    let out = trellis(&[
        "controller",
        "--platform",
        &format!(
            "consul={},token-file=/nonexistent/consul.token",
            double.addr()
        ),
        "--grpc",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("/nonexistent/consul.token"), "{stderr}");
}

/// A services file with `web` in namespace `demo` at `endpoints` (address, port).
fn web_at(endpoints: &[(&str, u16)]) -> String {
    let mut yaml = String::from(
        "namespace: demo\nservices:\n  - name: web\n    ports: [{ name: http, port: 8080, protocol: http }]\n    endpoints:\n",
    );
    for (address, port) in endpoints {
        yaml.push_str(&format!(
            "      - {{ address: {address}, port: {port}, service_account: web }}\n"
        ));
    }
    yaml
}

#[test]
fn an_address_in_two_platforms_and_a_stray_loopback_one_are_reported_by_check() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.yaml");
    let second = dir.path().join("second.yaml");
    std::fs::write(&first, web_at(&[("10.1.0.5", 8080)])).unwrap();
    std::fs::write(&second, web_at(&[("10.1.0.5", 8080), ("127.0.0.1", 9000)])).unwrap();
    let ctl = controller(&[
        "--platform",
        &format!("file={}", first.display()),
        "--platform",
        &format!("file={}", second.display()),
    ]);
    // Registrations are merged (and checked) for the services proxies ask for.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _watch = runtime.block_on(first_update(ctl.grpc, "web.demo"));
    let out = check_until(ctl.admin, |o| stdout(o).contains("problems: 2"));
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let conflict = format!(
        "10.1.0.5:8080 is registered by both file:{} and file:{}: file:{}'s registration is used",
        first.display(),
        second.display(),
        first.display()
    );
    assert!(text.contains(&conflict), "{text}");
    assert!(
        text.contains("Service demo/web: endpoint 127.0.0.1 from file:"),
        "{text}"
    );
}

#[test]
fn bad_platforms_are_refused_with_what_is_expected() {
    let out = trellis(&["controller", "--platform", "nomad=x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected file=PATH"));
}

#[test]
fn demo_once_moves_traffic_with_the_weights() {
    demo_once("file");
}

#[test]
fn demo_once_on_the_consul_double() {
    let text = demo_once("consul");
    assert!(
        text.contains("  consul      the Consul double at http://127.0.0.1:"),
        "{text}"
    );
}

/// Why the Cloud Map demos cannot run here, if they cannot.
fn without_moto() -> Option<&'static str> {
    std::env::var_os("TRELLIS_MOTO_SERVER")
        .is_none()
        .then_some("TRELLIS_MOTO_SERVER is unset (scripts/test installs moto[server] and sets it)")
}

#[test]
fn demo_once_on_cloud_map() {
    if let Some(reason) = without_moto() {
        println!("skipped: {reason}");
        return;
    }
    let text = demo_once("cloudmap");
    assert!(
        text.contains("  cloudmap    moto at http://127.0.0.1:"),
        "{text}"
    );
}

#[test]
fn demo_once_on_consul_and_cloud_map_at_once() {
    if let Some(reason) = without_moto() {
        println!("skipped: {reason}");
        return;
    }
    let text = demo_once("mixed");
    assert!(
        text.contains("  consul      the Consul double at")
            && text.contains("  cloudmap    moto at"),
        "{text}"
    );
}

/// `trellis demo --once --platform <platform>`: its checks passed and its lines say so; its
/// output.
fn demo_once(platform: &str) -> String {
    let out = Command::new(TRELLIS)
        .args(["demo", "--once", "--requests", "40", "--platform", platform])
        .output()
        .unwrap();
    let text = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let steps: Vec<&str> = text.lines().filter(|l| l.starts_with("step ")).collect();
    assert_eq!(steps.len(), 3, "{text}");
    assert!(
        steps[0].contains("v1=100 v2=0")
            && steps[0].contains("| v1    40")
            && steps[0].contains("| v2     0"),
        "{text}"
    );
    assert!(
        steps[1].contains("v1=50  v2=50")
            && steps[1].contains("| v1    20")
            && steps[1].contains("| v2    20"),
        "{text}"
    );
    assert!(
        steps[2].contains("| v1     0") && steps[2].contains("| v2    40"),
        "{text}"
    );
    // Every workload got its certificate from the controller's CA.
    for id in ["web", "client", "stranger"] {
        assert!(
            text.contains(&format!("spiffe://cluster.local/ns/demo/sa/{id}")),
            "{text}"
        );
    }
    // After the steps, the stranger (certified, named by no TrafficTarget) is refused at the
    // apps' proxies and nothing reaches the apps.
    let denied: Vec<&str> = text.lines().filter(|l| l.starts_with("denied: ")).collect();
    assert_eq!(denied.len(), 1, "{text}");
    assert!(
        denied[0]
            .contains("demo/stranger -> web.demo: 5/5 answered 403 x-trellis-error: forbidden;")
            && denied[0].contains("the apps recorded 0 requests from it")
            && denied[0].ends_with("ok"),
        "{text}"
    );
    // The proxies' counters: 3 x 40 requests allowed in, 5 denied, mTLS handshakes, none failed.
    let metrics: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("metrics: "))
        .collect();
    assert_eq!(metrics.len(), 1, "{text}");
    assert!(
        metrics[0]
            .contains(", 0 failed; inbound requests 120 allowed (200), 5 denied (403 forbidden)")
            && metrics[0].ends_with("ok")
            && !metrics[0].contains("handshakes 0 outbound")
            && !metrics[0].contains("/ 0 inbound"),
        "{text}"
    );
    assert!(
        text.contains(
            "summary: 3 steps, 40 requests each: traffic followed the weights; \
             the stranger was denied and nothing leaked; the proxies' metrics agree"
        ),
        "{text}"
    );
    text
}

#[cfg(feature = "kubernetes")]
#[test]
fn controller_on_kubernetes_reads_smi_policy_from_the_api_server() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = runtime.block_on(trellis_testing::smi_api_server());
    server
        .store()
        .apply(
            &trellis_testing::split_type(),
            serde_json::json!({
                "apiVersion": "split.smi-spec.io/v1alpha4",
                "kind": "TrafficSplit",
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"service": "web", "backends": [
                    {"service": "web-v1", "weight": 90},
                    {"service": "web-v2", "weight": 10}
                ]}
            }),
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    trellis_testing::write_kubeconfig(&server, &kubeconfig).unwrap();
    let ctl = controller_with_env(
        &["--platform", "kubernetes"],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    let out = check_until(ctl.admin, |o| stdout(o).contains("TrafficSplit shop/web"));
    let text = stdout(&out);
    assert!(text.contains("policy: ready"), "{text}");
    assert!(
        text.contains("policy source kubernetes: 1 resources"),
        "{text}"
    );
    assert!(
        text.contains("TrafficSplit shop/web: root web -> web-v1 90, web-v2 10"),
        "{text}"
    );
}

/// Built without the `kubernetes` feature (`--no-default-features`): `--platform kubernetes`
/// still parses and stops the start saying how to get it; the Kubernetes-only flags are gone.
#[cfg(not(feature = "kubernetes"))]
#[test]
fn without_the_kubernetes_feature_kubernetes_is_refused_with_the_reason() {
    let out = controller_command(TRELLIS)
        .args(["--platform", "kubernetes"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "--platform kubernetes: this trellis was built without the `kubernetes` feature; rebuild with default features"
        ),
        "{stderr}"
    );
    for flag in ["--ca-secret=ns/ca", "--leader-elect", "--token-audience=x"] {
        let out = controller_command(TRELLIS)
            .args(["--platform", "file=/dev/null", flag])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("unexpected argument"), "{flag}: {stderr}");
    }
}
