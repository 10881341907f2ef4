//! `--apply` on the wire, with no cluster: `trellis install --apply` and `trellis uninstall
//! --apply` talk to a recording HTTP server on 127.0.0.1 (through a kubeconfig, as with a real
//! API server), which answers each server-side apply with the object it was sent and each
//! delete with success (or 404 for the CA Secret). The test checks what a real API server would
//! receive: one request per object, in the printed order, at the right path, as
//! `application/apply-patch+yaml` with field manager `trellis-install`, forced, and `dryRun=All`
//! with `--dry-run`. What a real server makes of them is `install_real.rs`'s part.

use std::convert::Infallible;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde::Deserialize as _;
use serde_json::Value;

const TRELLIS: &str = env!("CARGO_BIN_EXE_trellis");

#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

/// Serves until the test ends; returns its URL and what it saw.
async fn recording_server() -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        async move { Ok::<_, Infallible>(answer(request, &log).await) }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, seen)
}

async fn answer(
    request: Request<hyper::body::Incoming>,
    log: &Mutex<Vec<Seen>>,
) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let body: Value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            // Apply patches may be YAML; JSON is YAML, so either parses here.
            Value::deserialize(serde_yaml_ng::Deserializer::from_slice(&bytes)).unwrap()
        })
    };
    let seen = Seen {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().unwrap_or_default().to_owned(),
        content_type: parts
            .headers
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default(),
        body: body.clone(),
    };
    log.lock().unwrap().push(seen.clone());
    let (status, reply) = match seen.method.as_str() {
        "PATCH" => (200, body),
        "DELETE" if seen.path.ends_with("/secrets/trellis-ca") => (
            404,
            serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound", "message": "secrets \"trellis-ca\" not found"}),
        ),
        "DELETE" => (
            200,
            serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200}),
        ),
        _ => (
            405,
            serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 405, "message": "not expected"}),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(reply.to_string())))
        .unwrap()
}

async fn trellis(kubeconfig: &std::path::Path, args: &[&str]) -> Output {
    let mut command = Command::new(TRELLIS);
    command.args(args).env("KUBECONFIG", kubeconfig);
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

/// The printed install's objects: (kind, name, namespace).
fn printed(args: &[&str]) -> Vec<(String, String, Option<String>)> {
    let output = Command::new(TRELLIS).args(args).output().unwrap();
    assert!(output.status.success());
    serde_yaml_ng::Deserializer::from_slice(&output.stdout)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .map(|v| {
            (
                v["kind"].as_str().unwrap().to_owned(),
                v["metadata"]["name"].as_str().unwrap().to_owned(),
                v["metadata"]["namespace"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

/// The API path of an object (core group under /api/v1, the others under /apis).
fn path_of(kind: &str, name: &str, namespace: Option<&str>) -> String {
    let (prefix, plural) = match kind {
        "Namespace" => ("/api/v1", "namespaces"),
        "ServiceAccount" => ("/api/v1", "serviceaccounts"),
        "Secret" => ("/api/v1", "secrets"),
        "Service" => ("/api/v1", "services"),
        "CustomResourceDefinition" => {
            ("/apis/apiextensions.k8s.io/v1", "customresourcedefinitions")
        }
        "ClusterRole" => ("/apis/rbac.authorization.k8s.io/v1", "clusterroles"),
        "ClusterRoleBinding" => ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings"),
        "Role" => ("/apis/rbac.authorization.k8s.io/v1", "roles"),
        "RoleBinding" => ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
        "Deployment" => ("/apis/apps/v1", "deployments"),
        "PodDisruptionBudget" => ("/apis/policy/v1", "poddisruptionbudgets"),
        "MutatingWebhookConfiguration" => (
            "/apis/admissionregistration.k8s.io/v1",
            "mutatingwebhookconfigurations",
        ),
        "APIService" => ("/apis/apiregistration.k8s.io/v1", "apiservices"),
        other => panic!("unexpected kind {other}"),
    };
    match namespace {
        Some(ns) => format!("{prefix}/namespaces/{ns}/{plural}/{name}"),
        None => format!("{prefix}/{plural}/{name}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_and_delete_send_one_request_per_object_in_order() {
    let (url, seen) = recording_server().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        trellis_testing::kubernetes::kubeconfig_yaml(&url),
    )
    .unwrap();

    // With --prometheus: the install then has every kind the uninstall removes (the
    // TrafficMetrics APIService and its kube-system RoleBinding too).
    let install = [
        "install",
        "--generate-ca",
        "--namespace",
        "mesh-wire",
        "--prometheus",
        "http://prometheus.monitoring:9090",
    ];
    let objects = printed(&install);
    let mut apply = install.to_vec();
    apply.push("--apply");
    let output = trellis(&kubeconfig, &apply).await;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let requests = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(requests.len(), objects.len(), "{requests:#?}");
    for ((kind, name, namespace), (request, line)) in
        objects.iter().zip(requests.iter().zip(stdout.lines()))
    {
        assert_eq!(request.method, "PATCH");
        assert_eq!(request.path, path_of(kind, name, namespace.as_deref()));
        assert_eq!(request.content_type, "application/apply-patch+yaml");
        assert!(
            request.query.contains("fieldManager=trellis-install"),
            "{}",
            request.query
        );
        assert!(request.query.contains("force=true"), "{}", request.query);
        assert!(!request.query.contains("dryRun"), "{}", request.query);
        assert_eq!(request.body["kind"], kind.as_str());
        assert_eq!(request.body["metadata"]["name"], name.as_str());
        let described = match namespace {
            Some(ns) => format!("applied {kind} {ns}/{name}"),
            None => format!("applied {kind} {name}"),
        };
        assert_eq!(line, described);
    }

    // --dry-run: the same requests, each with dryRun=All.
    apply.push("--dry-run");
    let output = trellis(&kubeconfig, &apply).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let requests = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(requests.len(), objects.len());
    assert!(
        requests.iter().all(|r| r.query.contains("dryRun=All")),
        "{requests:#?}"
    );

    // The uninstall deletes the same objects in reverse, the CRDs last; a missing one is reported.
    let uninstall = ["uninstall", "--namespace", "mesh-wire"];
    let removed = printed(&uninstall);
    let mut delete = uninstall.to_vec();
    delete.push("--apply");
    let output = trellis(&kubeconfig, &delete).await;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let requests = std::mem::take(&mut *seen.lock().unwrap());
    let paths: Vec<String> = requests.iter().map(|r| r.path.clone()).collect();
    let expected: Vec<String> = removed
        .iter()
        .map(|(kind, name, ns)| path_of(kind, name, ns.as_deref()))
        .collect();
    assert_eq!(paths, expected);
    assert!(requests.iter().all(|r| r.method == "DELETE"));
    assert!(
        stdout.contains("absent Secret mesh-wire/trellis-ca"),
        "{stdout}"
    );
    assert!(
        stdout.contains("deleted MutatingWebhookConfiguration trellis-proxy-injector-mesh-wire")
    );
    let mut installed: Vec<_> = objects.clone();
    let mut uninstalled: Vec<_> = removed.clone();
    installed.sort();
    uninstalled.sort();
    assert_eq!(
        installed, uninstalled,
        "the uninstall removes exactly what the install made"
    );
}
