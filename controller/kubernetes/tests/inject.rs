//! The sidecar injection webhook against golden files: AdmissionReview requests as the API
//! server sends them (`tests/inject/<case>.request.json`) -> the response review with its JSON
//! Patch decoded, and the Skip (`tests/inject/<case>.expected.json`). Run with `TRELLIS_BLESS=1`
//! to rewrite the expected files after a deliberate change, then read the diff.
//!
//! Beyond the text: every patch is applied to its pod (RFC 6902, as the API server does), the
//! result must be a valid Pod whose init container's command line parses back to the same rules
//! and whose proxy gets the original probes; reviewing the patched pod again changes nothing.

use std::path::PathBuf;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use trellis_controller_kubernetes::inject::{self, InjectOptions};
use trellis_intercept::InterceptRules;
use trellis_intercept::app_probe::{self, AppProbe};

const CA_PEM: &str =
    "-----BEGIN CERTIFICATE-----\nMIIBdzCCAR2gAwIBAgIUTESTANCHOR\n-----END CERTIFICATE-----\n";

fn options() -> InjectOptions {
    let mut options = InjectOptions::new(
        "registry.example/trellis-proxy:test",
        "https://trellis-controller.trellis.svc:8090",
        CA_PEM,
    );
    options.trust_domain = "mesh.example".into();
    options
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/inject")
}

fn request(case: &str) -> Vec<u8> {
    let path = dir().join(format!("{case}.request.json"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The response review as JSON with `patch` (bytes: kube writes them as a JSON array of
/// numbers, which the API server's decoder takes for `[]byte` as it does base64) decoded to the
/// JSON Patch itself.
fn readable(review: &kube::core::admission::AdmissionReview<kube::core::DynamicObject>) -> Value {
    let mut value = serde_json::to_value(review).unwrap();
    if let Some(patch) = &review.response.as_ref().unwrap().patch {
        value["response"]["patch"] = serde_json::from_slice(patch).unwrap();
    }
    value
}

/// Checks (or with TRELLIS_BLESS=1 writes) one case's expected file; returns the answer.
fn golden(case: &str) -> inject::Injected {
    let injected = inject::review(&request(case), &options())
        .unwrap_or_else(|e| panic!("{case}: the review was refused: {e}"));
    let skipped = injected.skipped.as_ref().map(|s| {
        json!({"namespace": s.namespace, "pod_name_or_generate_name": s.pod_name_or_generate_name, "reason": s.reason})
    });
    let actual = json!({"review": readable(&injected.review), "skipped": skipped});
    // The injector's version changes with releases; the golden files say {VERSION}.
    let text = serde_json::to_string_pretty(&actual).unwrap() + "\n";
    let text = text.replace(&format!("\"{}\"", inject::VERSION), "\"{VERSION}\"");
    let path = dir().join(format!("{case}.expected.json"));
    if std::env::var_os("TRELLIS_BLESS").is_some() {
        std::fs::write(&path, &text).unwrap();
    } else {
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (TRELLIS_BLESS=1 writes it; read it before committing)",
                path.display()
            )
        });
        assert_eq!(
            text,
            expected,
            "{case}: the answer differs from {} (TRELLIS_BLESS=1 rewrites it)",
            path.display()
        );
    }
    injected
}

fn response(injected: &inject::Injected) -> Value {
    readable(&injected.review)["response"].clone()
}

/// The pod after the answer's patch, as the API server would store it.
fn patched(case: &str, injected: &inject::Injected) -> Value {
    let review: Value = serde_json::from_slice(&request(case)).unwrap();
    let mut pod = review["request"]["object"].clone();
    let patch: json_patch::Patch =
        serde_json::from_value(response(injected)["patch"].clone()).unwrap();
    json_patch::patch(&mut pod, &patch)
        .unwrap_or_else(|e| panic!("{case}: the patch does not apply: {e}"));
    // It must still be a Pod.
    let _: Pod = serde_json::from_value(pod.clone()).unwrap();
    pod
}

/// Reviews `pod` again, as if the API server re-invoked the webhook (reinvocationPolicy).
fn review_again(case: &str, pod: &Value) -> Value {
    let mut review: Value = serde_json::from_slice(&request(case)).unwrap();
    review["request"]["object"] = pod.clone();
    let injected = inject::review(&serde_json::to_vec(&review).unwrap(), &options()).unwrap();
    assert!(injected.skipped.is_none());
    response(&injected)
}

fn env_of(container: &Value, name: &str) -> Option<String> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
        .map(str::to_owned)
}

fn init_containers(pod: &Value) -> Vec<Value> {
    pod["spec"]["initContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn assert_meshed(case: &str, injected: &inject::Injected) -> Value {
    let answer = response(injected);
    assert_eq!(answer["allowed"], true, "{case}: {answer}");
    assert_eq!(answer["patchType"], "JSONPatch", "{case}");
    let pod = patched(case, injected);
    let inits = init_containers(&pod);
    assert_eq!(inits[0]["name"], "trellis-init", "{case}");
    assert_eq!(inits[1]["name"], "trellis-proxy", "{case}");
    assert_eq!(inits[1]["restartPolicy"], "Always", "{case}");
    assert_eq!(
        pod["metadata"]["annotations"]["trellis.io/injected"],
        inject::VERSION
    );
    assert_eq!(pod["metadata"]["labels"]["trellis.io/proxy"], "injected");
    // The init container's command line is InterceptRules::args of the rules it installs.
    let args: Vec<String> = serde_json::from_value(inits[0]["args"].clone()).unwrap();
    let rules = InterceptRules::parse_args(&args).unwrap();
    assert_eq!(rules.args(), args, "{case}");
    assert_eq!(rules.proxy_uid, 1337);
    assert!(
        rules.skip_inbound_ports.contains(&15020),
        "{case}: {args:?}"
    );
    // Injecting the injected pod again: allowed, nothing to change.
    let again = review_again(case, &pod);
    assert_eq!(again["allowed"], true, "{case}: {again}");
    assert!(
        again.get("patch").is_none(),
        "{case}: a second injection patched: {again}"
    );
    pod
}

#[test]
fn a_deployment_pod_gets_the_init_container_the_proxy_and_its_identity() {
    let injected = golden("deployment-pod");
    assert!(injected.skipped.is_none());
    let pod = assert_meshed("deployment-pod", &injected);
    let proxy = &init_containers(&pod)[1];
    assert_eq!(
        env_of(proxy, "TRELLIS_PROXY_WORKLOAD_KIND").as_deref(),
        Some("deployment")
    );
    assert_eq!(
        env_of(proxy, "TRELLIS_PROXY_WORKLOAD_NAME").as_deref(),
        Some("web")
    );
    assert_eq!(
        env_of(proxy, "TRELLIS_PROXY_WORKLOAD").as_deref(),
        Some("$(POD_NAMESPACE)/$(POD_SERVICE_ACCOUNT)")
    );
    assert_eq!(
        env_of(proxy, "TRELLIS_PROXY_CONTROLLER_CA_PEM").as_deref(),
        Some(CA_PEM)
    );
    assert_eq!(env_of(proxy, "TRELLIS_PROXY_APP_PROBES"), None);
    // The pod's own volumes stay, ours are appended; the token is for the `trellis` audience.
    let volumes = pod["spec"]["volumes"].as_array().unwrap();
    assert_eq!(volumes[0]["name"], "kube-api-access-7xq2f");
    let token = &volumes[2]["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"], "trellis");
    assert_eq!(token["expirationSeconds"], 3600);
}

#[test]
fn skip_annotations_become_the_init_containers_arguments() {
    let injected = golden("skip-annotations");
    let pod = assert_meshed("skip-annotations", &injected);
    let args: Vec<String> =
        serde_json::from_value(init_containers(&pod)[0]["args"].clone()).unwrap();
    let rules = InterceptRules::parse_args(&args).unwrap();
    assert_eq!(rules.skip_inbound_ports, [15020, 9090, 9091]);
    assert_eq!(rules.skip_outbound_ports, [5432]);
    assert_eq!(
        rules.skip_outbound_cidrs,
        [
            "169.254.169.254/32".parse().unwrap(),
            "fd00::/8".parse().unwrap()
        ]
    );
}

#[test]
fn http_and_tcp_probes_move_to_the_admin_port_grpc_and_exec_stay() {
    let injected = golden("probes");
    let pod = assert_meshed("probes", &injected);
    let db = &pod["spec"]["containers"][0];
    for (field, kind) in [
        ("livenessProbe", "liveness"),
        ("readinessProbe", "readiness"),
        ("startupProbe", "startup"),
    ] {
        let probe = &db[field];
        assert_eq!(
            probe["httpGet"],
            json!({"path": format!("/app-probe/db/{kind}"), "port": 15020, "scheme": "HTTP"}),
            "{field}"
        );
        assert!(probe.get("tcpSocket").is_none(), "{field}: {probe}");
    }
    // Timing is kept.
    assert_eq!(db["livenessProbe"]["initialDelaySeconds"], 5);
    assert_eq!(db["startupProbe"]["failureThreshold"], 30);
    let metrics = &pod["spec"]["containers"][1];
    assert_eq!(metrics["livenessProbe"]["grpc"]["port"], 9000);
    assert_eq!(
        metrics["readinessProbe"]["exec"]["command"][0],
        "/bin/ready"
    );
    // The pod's own init container runs after the proxy has started.
    let inits = init_containers(&pod);
    assert_eq!(inits[2]["name"], "migrate");
    let proxy = &inits[1];
    assert_eq!(
        env_of(proxy, "TRELLIS_PROXY_WORKLOAD_KIND").as_deref(),
        Some("statefulset")
    );
    assert_eq!(
        env_of(proxy, "TRELLIS_PROXY_WORKLOAD_NAME").as_deref(),
        Some("db")
    );
    let probes = app_probe::parse(&env_of(proxy, "TRELLIS_PROXY_APP_PROBES").unwrap()).unwrap();
    assert_eq!(probes.len(), 3);
    assert_eq!(
        probes["/app-probe/db/liveness"],
        AppProbe::Http {
            port: 8081,
            path: "/healthz".into(),
            scheme: "HTTP".into(),
            headers: vec![app_probe::Header {
                name: "X-Probe".into(),
                value: "liveness".into()
            }],
            timeout_seconds: Some(2),
        }
    );
    assert_eq!(
        probes["/app-probe/db/readiness"],
        AppProbe::Tcp {
            tcp: 5432,
            timeout_seconds: Some(1)
        }
    );
    assert!(matches!(
        &probes["/app-probe/db/startup"],
        AppProbe::Http { port: 8443, scheme, .. } if scheme == "HTTPS"
    ));
}

#[test]
fn a_bare_pod_is_its_own_workload() {
    let injected = golden("bare-pod");
    let pod = assert_meshed("bare-pod", &injected);
    let proxy = &init_containers(&pod)[1];
    assert_eq!(
        env_of(proxy, "TRELLIS_PROXY_WORKLOAD_KIND").as_deref(),
        Some("pod")
    );
    assert_eq!(
        env_of(proxy, "TRELLIS_PROXY_WORKLOAD_NAME").as_deref(),
        Some("debug")
    );
}

#[test]
fn an_injected_pod_gets_no_patch() {
    let injected = golden("already-injected");
    assert!(injected.skipped.is_none());
    let answer = response(&injected);
    assert_eq!(answer["allowed"], true);
    assert!(answer.get("patch").is_none(), "{answer}");
}

#[test]
fn pods_that_cannot_or_will_not_be_meshed_are_admitted_unchanged_with_the_reason() {
    for (case, pod, reason) in [
        (
            "opt-out",
            "web-7d9f8c6b5-",
            "annotation trellis.io/inject: disabled",
        ),
        ("host-network", "web-7d9f8c6b5-", "hostNetwork: true"),
        ("port-clash", "web-7d9f8c6b5-", "listens on port 15020"),
    ] {
        let injected = golden(case);
        let answer = response(&injected);
        assert_eq!(answer["allowed"], true, "{case}");
        assert!(answer.get("patch").is_none(), "{case}: {answer}");
        let skip = injected
            .skipped
            .unwrap_or_else(|| panic!("{case}: no Skip"));
        assert_eq!(skip.namespace, "shop");
        assert_eq!(skip.pod_name_or_generate_name, pod);
        assert!(skip.reason.contains(reason), "{case}: {}", skip.reason);
    }
}

#[test]
fn a_bad_skip_annotation_denies_the_pod_naming_annotation_and_item() {
    let injected = golden("bad-skip-annotation");
    let answer = response(&injected);
    assert_eq!(answer["allowed"], false);
    assert_eq!(answer["uid"], "a1f0c6e2-0007-4b7a-9a11-5c1d2e3f4a5b");
    let message = answer["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("trellis.io/skip-outbound-cidrs") && message.contains("10.300.0.0/16"),
        "{message}"
    );
    assert!(injected.skipped.is_none());
}

#[test]
fn objects_other_than_pods_are_allowed_unchanged() {
    let injected = golden("not-a-pod");
    let answer = response(&injected);
    assert_eq!(answer["allowed"], true);
    assert!(answer.get("patch").is_none());
    assert!(injected.skipped.is_none());
}

#[test]
fn malformed_reviews_are_refused_with_the_reason() {
    let error = inject::review(&request("malformed"), &options()).unwrap_err();
    assert!(
        error.to_string().contains("not an AdmissionReview"),
        "{error}"
    );
    let error = inject::review(
        br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1"}"#,
        &options(),
    )
    .unwrap_err();
    assert!(error.to_string().contains("no `request`"), "{error}");
    let error = inject::review(
        br#"{"kind":"ConversionReview","apiVersion":"apiextensions.k8s.io/v1","request":{"uid":"1","desiredAPIVersion":"v1","objects":[]}}"#,
        &options(),
    )
    .unwrap_err();
    assert!(
        error.to_string().contains("not an AdmissionReview"),
        "{error}"
    );
    // A v1beta1 review (the configuration asks for v1 only).
    let mut review: Value = serde_json::from_slice(&request("deployment-pod")).unwrap();
    review["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let error = inject::review(&serde_json::to_vec(&review).unwrap(), &options()).unwrap_err();
    assert!(
        error.to_string().contains("admission.k8s.io/v1beta1"),
        "{error}"
    );
}

async fn call(
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> (StatusCode, String, Option<inject::Skip>) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let (response, skip) = inject::handle(request, &options()).await;
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), skip)
}

#[tokio::test]
async fn handle_answers_post_inject_and_refuses_the_rest() {
    let (status, body, skip) = call(Method::POST, inject::PATH, request("deployment-pod")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(skip.is_none());
    let review: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(review["kind"], "AdmissionReview");
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(
        review["response"]["uid"],
        "a1f0c6e2-0001-4b7a-9a11-5c1d2e3f4a5b"
    );

    let (status, _, skip) = call(Method::POST, inject::PATH, request("host-network")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(skip.unwrap().reason.contains("hostNetwork"));

    let (status, body, _) = call(Method::POST, inject::PATH, request("malformed")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("not an AdmissionReview"), "{body}");
    let (status, _, _) = call(Method::GET, inject::PATH, Vec::new()).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (status, _, _) = call(Method::POST, "/convert", request("deployment-pod")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = call(
        Method::POST,
        inject::PATH,
        vec![b' '; inject::MAX_BODY_BYTES + 1],
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

/// Reviews the `deployment-pod` request with `annotation` set to `value` on the pod, under
/// `options`.
fn review_with_metrics_compat(value: Option<&str>, options: &InjectOptions) -> Value {
    let mut review: Value = serde_json::from_slice(&request("deployment-pod")).unwrap();
    if let Some(value) = value {
        review["request"]["object"]["metadata"]["annotations"][inject::METRICS_COMPAT] =
            Value::String(value.to_owned());
    }
    let injected = inject::review(&serde_json::to_vec(&review).unwrap(), options).unwrap();
    let answer = response(&injected);
    if answer["allowed"] == false {
        return answer;
    }
    let mut pod = review["request"]["object"].clone();
    let patch: json_patch::Patch = serde_json::from_value(answer["patch"].clone()).unwrap();
    json_patch::patch(&mut pod, &patch).unwrap();
    init_containers(&pod)[1].clone()
}

#[test]
fn metrics_compat_comes_from_the_injector_or_the_pods_annotation_and_bad_names_are_refused() {
    let mut with_default = options();
    with_default.metrics_compat = "linkerd".into();
    // None by default: no variable.
    let proxy = review_with_metrics_compat(None, &options());
    assert_eq!(env_of(&proxy, "TRELLIS_PROXY_METRICS_COMPAT"), None);
    // The injector's setting...
    let proxy = review_with_metrics_compat(None, &with_default);
    assert_eq!(
        env_of(&proxy, "TRELLIS_PROXY_METRICS_COMPAT").as_deref(),
        Some("linkerd")
    );
    // ...and a pod's annotation over it.
    let proxy = review_with_metrics_compat(Some("osm,istio"), &with_default);
    assert_eq!(
        env_of(&proxy, "TRELLIS_PROXY_METRICS_COMPAT").as_deref(),
        Some("osm,istio")
    );
    // An unknown name denies the pod, naming annotation and item (the proxy would not start).
    let answer = review_with_metrics_compat(Some("osm,prometheus"), &with_default);
    assert_eq!(answer["allowed"], false);
    let message = answer["status"]["message"].as_str().unwrap();
    assert!(
        message.contains(inject::METRICS_COMPAT) && message.contains("\"prometheus\""),
        "{message}"
    );
}
