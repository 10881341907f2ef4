//! The CRD conversion webhook over real HTTPS on loopback: ConversionReviews for every SMI kind
//! and version pair (the smi crate's example documents with API-server metadata added), Flagger's
//! TrafficSplit writes, failures that name object, kind, name and field, malformed reviews, the
//! certificate reload, and the generated CRDs pointing at the path served.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use trellis_controller_kubernetes::webhook::{self, tls::ReloadingCert};

// ---------------------------------------------------------------------------------------------
// Test support: a CA, serving certificates, a server and an HTTPS client.

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// Writes a leaf for 127.0.0.1 and localhost to `cert`/`key`; returns the leaf's DER.
    fn write_leaf(&self, cert: &Path, key: &Path) -> CertificateDer<'static> {
        let key_pair = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
        let leaf = params.signed_by(&key_pair, &self.issuer).unwrap();
        std::fs::write(cert, leaf.pem()).unwrap();
        std::fs::write(key, key_pair.serialize_pem()).unwrap();
        leaf.der().clone()
    }
}

struct Server {
    addr: SocketAddr,
    ca: CertificateDer<'static>,
    cert: Arc<ReloadingCert>,
    dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
    issuer: Ca,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    fn cert_path(&self) -> PathBuf {
        self.dir.path().join("tls.crt")
    }
    fn key_path(&self) -> PathBuf {
        self.dir.path().join("tls.key")
    }
}

async fn start_https() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let issuer = Ca::new();
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    issuer.write_leaf(&cert_path, &key_path);
    let cert = ReloadingCert::load(&cert_path, &key_path).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(webhook::serve(listener, Some(cert.server_config())));
    Server {
        addr,
        ca: issuer.der(),
        cert,
        dir,
        task,
        issuer,
    }
}

/// One HTTPS request on a new connection; returns the status, the body and the certificate the
/// server presented.
async fn https(
    server: &Server,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> (StatusCode, Bytes, CertificateDer<'static>) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server.ca.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (status, body) = exchange(TokioIo::new(tls), method, path, body).await;
    (status, body, presented)
}

async fn exchange<I>(io: I, method: Method, path: &str, body: Vec<u8>) -> (StatusCode, Bytes)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "trellis-controller.trellis-system.svc")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    (
        status,
        response.into_body().collect().await.unwrap().to_bytes(),
    )
}

/// Sends a ConversionReview and returns the response review (asserting HTTP 200 and the uid).
async fn convert(server: &Server, desired: &str, objects: &[Value]) -> Value {
    let uid = format!("uid-{}", fastish_id());
    let review = json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "ConversionReview",
        "request": {"uid": uid, "desiredAPIVersion": desired, "objects": objects},
    });
    let (status, body, _) = https(
        server,
        Method::POST,
        "/convert",
        serde_json::to_vec(&review).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["apiVersion"], "apiextensions.k8s.io/v1");
    assert_eq!(answer["kind"], "ConversionReview");
    assert_eq!(answer["response"]["uid"], uid.as_str());
    answer
}

fn fastish_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn success(answer: &Value) -> Vec<Value> {
    assert_eq!(
        answer["response"]["result"]["status"], "Success",
        "expected Success: {answer:#}"
    );
    answer["response"]["convertedObjects"]
        .as_array()
        .unwrap()
        .clone()
}

/// What the API server adds to every object it sends.
fn as_stored(mut object: Value, index: usize) -> Value {
    let api_version = object["apiVersion"].clone();
    let metadata = object["metadata"].as_object_mut().unwrap();
    metadata.insert(
        "uid".into(),
        json!(format!("6b0f5c3e-0000-4000-8000-{index:012}")),
    );
    metadata.insert("resourceVersion".into(), json!(format!("{}", 1000 + index)));
    metadata.insert("generation".into(), json!(3));
    metadata.insert("creationTimestamp".into(), json!("2026-11-22T01:02:03Z"));
    metadata.insert(
        "managedFields".into(),
        json!([{"apiVersion": api_version, "fieldsType": "FieldsV1",
                "fieldsV1": {"f:spec": {".": {}}}, "manager": "flagger",
                "operation": "Update", "time": "2026-11-22T01:02:03Z"}]),
    );
    metadata.insert("labels".into(), json!({"app": "demo"}));
    object
}

fn examples() -> Vec<(String, Vec<Value>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../smi/tests/data/examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut index = 0;
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let objects = serde_yaml_ng::Deserializer::from_str(&text)
                .map(|doc| {
                    index += 1;
                    let value: Value = serde::Deserialize::deserialize(doc).unwrap();
                    as_stored(value, index)
                })
                // Only SMI kinds go through the webhook (TrafficPolicy has one version).
                .filter(|object| {
                    object["kind"]
                        .as_str()
                        .and_then(trellis_smi::model::Kind::from_name)
                        .is_some_and(|kind| kind.is_smi())
                })
                .collect();
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                objects,
            )
        })
        .collect()
}

fn versions_of(kind: &str) -> &'static [&'static str] {
    trellis_smi::model::Kind::from_name(kind)
        .unwrap()
        .versions()
}

fn group_of(api_version: &str) -> &str {
    api_version.split_once('/').unwrap().0
}

fn has_map_headers(object: &Value) -> bool {
    let matches = object.get("spec").unwrap_or(object).get("matches");
    matches.and_then(Value::as_array).is_some_and(|ms| {
        ms.iter()
            .any(|m| m.get("headers").is_some_and(Value::is_object))
    })
}

fn without_annotations(metadata: &Value) -> Value {
    let mut metadata = metadata.clone();
    metadata.as_object_mut().unwrap().remove("annotations");
    metadata
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn every_kind_and_version_pair_round_trips_byte_equal() {
    let server = start_https().await;
    let mut pairs = 0;
    let mut sources = BTreeSet::new();
    for (file, objects) in examples() {
        let mut kinds: Vec<&str> = objects
            .iter()
            .map(|o| o["kind"].as_str().unwrap())
            .collect();
        kinds.sort_unstable();
        kinds.dedup();
        for kind in kinds {
            let sent: Vec<Value> = objects
                .iter()
                .filter(|o| o["kind"] == kind)
                .cloned()
                .collect();
            let api_version = sent[0]["apiVersion"].as_str().unwrap().to_owned();
            let group = group_of(&api_version);
            sources.insert((
                kind.to_owned(),
                api_version.split_once('/').unwrap().1.to_owned(),
            ));
            // The canonical form (what the webhook writes for the object's own version) is the
            // object itself, except for header matches in the map form, which are written as
            // the list form (smi's documented choice).
            let canonical = success(&convert(&server, &api_version, &sent).await);
            for (original, canonical) in sent.iter().zip(&canonical) {
                if !has_map_headers(original) {
                    assert_eq!(
                        serde_json::to_string(canonical).unwrap(),
                        serde_json::to_string(original).unwrap(),
                        "{file}: {kind} is not canonical"
                    );
                }
            }
            for version in versions_of(kind) {
                let desired = format!("{group}/{version}");
                let there = success(&convert(&server, &desired, &sent).await);
                assert_eq!(there.len(), sent.len());
                for (original, converted) in sent.iter().zip(&there) {
                    assert_eq!(converted["apiVersion"], desired.as_str(), "{file}");
                    assert_eq!(converted["kind"], kind, "{file}");
                    // The API server rejects conversions that touch metadata other than
                    // labels and annotations.
                    assert_eq!(
                        without_annotations(&converted["metadata"]),
                        without_annotations(&original["metadata"]),
                        "{file}: {kind} to {desired}"
                    );
                }
                let back = success(&convert(&server, &api_version, &there).await);
                for (original, returned) in canonical.iter().zip(&back) {
                    assert_eq!(
                        serde_json::to_string(returned).unwrap(),
                        serde_json::to_string(original).unwrap(),
                        "{file}: {kind} {api_version} -> {desired} -> back is not byte-equal"
                    );
                }
                pairs += 1;
            }
        }
    }
    // Every kind in every version was a source, and went to every version of its kind.
    let all: BTreeSet<(String, String)> = trellis_smi::model::Kind::ALL
        .iter()
        .filter(|k| k.is_smi())
        .flat_map(|k| {
            k.versions()
                .iter()
                .map(|v| (k.as_str().to_owned(), (*v).to_owned()))
        })
        .collect();
    assert_eq!(sources, all);
    // Some files hold helper documents of other kinds (a split's route group), so a kind and
    // version can be a source more than once.
    assert!(pairs >= 4 * 4 + 3 * 3 + 4 * 4 + 4 * 4, "{pairs} pairs");
}

fn split(version: &str, name: &str, backends: Value, extra_spec: Option<(&str, Value)>) -> Value {
    let mut spec = json!({"service": "podinfo", "backends": backends});
    if let Some((key, value)) = extra_spec {
        spec[key] = value;
    }
    as_stored(
        json!({
            "apiVersion": format!("split.smi-spec.io/{version}"),
            "kind": "TrafficSplit",
            "metadata": {"name": name, "namespace": "test"},
            "spec": spec,
        }),
        fastish_id() as usize,
    )
}

#[tokio::test]
async fn flagger_writes_convert_to_v1alpha4_and_back_exactly() {
    let server = start_https().await;

    // linkerd provider: v1alpha1 with quantity weights, one of them fractional.
    let v1 = split(
        "v1alpha1",
        "podinfo",
        json!([{"service": "podinfo-canary", "weight": "500m"},
               {"service": "podinfo-primary", "weight": "1"}]),
        None,
    );
    let stored = success(
        &convert(
            &server,
            "split.smi-spec.io/v1alpha4",
            std::slice::from_ref(&v1),
        )
        .await,
    );
    assert_eq!(
        stored[0]["spec"]["backends"],
        json!([{"service": "podinfo-canary", "weight": 1},
               {"service": "podinfo-primary", "weight": 2}]),
        "500m:1 is 1:2, never 500:1"
    );
    assert_eq!(
        stored[0]["metadata"]["annotations"]["split.smi-spec.io/trellis-weights"],
        r#"["500m","1"]"#
    );
    let back = success(&convert(&server, "split.smi-spec.io/v1alpha1", &stored).await);
    assert_eq!(
        serde_json::to_vec(&back[0]).unwrap(),
        serde_json::to_vec(&v1).unwrap()
    );

    // osm provider: v1alpha2 integers summing to 100.
    let v2 = split(
        "v1alpha2",
        "podinfo-osm",
        json!([{"service": "podinfo-canary", "weight": 10},
               {"service": "podinfo-primary", "weight": 90}]),
        None,
    );
    let stored = success(
        &convert(
            &server,
            "split.smi-spec.io/v1alpha4",
            std::slice::from_ref(&v2),
        )
        .await,
    );
    assert_eq!(stored[0]["spec"]["backends"][1]["weight"], 90);
    assert!(
        stored[0]["metadata"].get("annotations").is_none(),
        "{:#}",
        stored[0]
    );
    let back = success(&convert(&server, "split.smi-spec.io/v1alpha2", &stored).await);
    assert_eq!(
        serde_json::to_vec(&back[0]).unwrap(),
        serde_json::to_vec(&v2).unwrap()
    );

    // smi:v1alpha3 provider, with matches; down to v1alpha2 (no matches) and back keeps them.
    let v3 = split(
        "v1alpha3",
        "podinfo-smi",
        json!([{"service": "podinfo-canary", "weight": 0},
               {"service": "podinfo-primary", "weight": 100}]),
        Some((
            "matches",
            json!([{"kind": "HTTPRouteGroup", "name": "ab-test"}]),
        )),
    );
    let stored = success(
        &convert(
            &server,
            "split.smi-spec.io/v1alpha4",
            std::slice::from_ref(&v3),
        )
        .await,
    );
    assert_eq!(stored[0]["spec"]["matches"], v3["spec"]["matches"]);
    let old = success(&convert(&server, "split.smi-spec.io/v1alpha2", &stored).await);
    assert!(old[0]["spec"].get("matches").is_none());
    assert_eq!(
        old[0]["metadata"]["annotations"]["split.smi-spec.io/trellis-matches"],
        r#"[{"kind":"HTTPRouteGroup","name":"ab-test"}]"#
    );
    let back = success(&convert(&server, "split.smi-spec.io/v1alpha3", &old).await);
    assert_eq!(
        serde_json::to_vec(&back[0]).unwrap(),
        serde_json::to_vec(&v3).unwrap()
    );
}

#[tokio::test]
async fn a_bad_object_fails_the_review_naming_object_kind_name_and_field() {
    let server = start_https().await;
    let good = split(
        "v1alpha2",
        "good",
        json!([{"service": "a", "weight": 1}]),
        None,
    );
    let bad = split(
        "v1alpha2",
        "bad",
        json!([{"service": "a", "weight": 1}, {"service": "b", "weight": "ten"}]),
        None,
    );
    let answer = convert(&server, "split.smi-spec.io/v1alpha4", &[good, bad]).await;
    let response = &answer["response"];
    assert_eq!(response["result"]["status"], "Failure");
    assert_eq!(response["convertedObjects"], json!([]));
    let message = response["result"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "objects[1] TrafficSplit test/bad (converting to split.smi-spec.io/v1alpha4): spec.backends[1].weight: "
        ),
        "{message}"
    );

    // A kind that does not exist in the asked version.
    let udp = as_stored(
        json!({"apiVersion": "specs.smi-spec.io/v1alpha4", "kind": "UDPRoute",
               "metadata": {"name": "dns", "namespace": "test"},
               "spec": {"matches": {"ports": [53]}}}),
        1,
    );
    let answer = convert(&server, "specs.smi-spec.io/v1alpha2", &[udp]).await;
    assert_eq!(answer["response"]["result"]["status"], "Failure");
    assert_eq!(
        answer["response"]["result"]["message"],
        "objects[0] UDPRoute test/dns (converting to specs.smi-spec.io/v1alpha2): UDPRoute has no version specs.smi-spec.io/v1alpha2"
    );
}

#[tokio::test]
async fn malformed_reviews_are_400_and_other_requests_are_refused() {
    let server = start_https().await;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{not json".to_vec(), "the body is not a ConversionReview"),
        (
            serde_json::to_vec(&json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "ConversionReview"}))
                .unwrap(),
            "the ConversionReview has no `request`",
        ),
        (
            serde_json::to_vec(&json!({"apiVersion": "apiextensions.k8s.io/v1beta1", "kind": "ConversionReview",
                "request": {"uid": "1", "desiredAPIVersion": "split.smi-spec.io/v1alpha4", "objects": []}}))
            .unwrap(),
            "expected apiVersion apiextensions.k8s.io/v1 and kind ConversionReview, got apiVersion \"apiextensions.k8s.io/v1beta1\"",
        ),
        (
            serde_json::to_vec(&json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "ConversionReview",
                "request": {"uid": "1", "objects": []}}))
            .unwrap(),
            "missing field `desiredAPIVersion`",
        ),
    ];
    for (body, expected) in cases {
        let (status, text, _) = https(&server, Method::POST, "/convert", body).await;
        let text = String::from_utf8_lossy(&text);
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        assert!(text.contains(expected), "{text:?} should say {expected:?}");
    }
    let (status, _, _) = https(&server, Method::GET, "/convert", Vec::new()).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (status, _, _) = https(&server, Method::POST, "/mutate", Vec::new()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = https(
        &server,
        Method::POST,
        "/convert",
        vec![b' '; webhook::MAX_BODY_BYTES + 1],
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn plain_http_serves_the_same_endpoint() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(webhook::serve(listener, None));
    let v2 = split(
        "v1alpha2",
        "plain",
        json!([{"service": "a", "weight": 3}]),
        None,
    );
    let review = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "ConversionReview",
        "request": {"uid": "u", "desiredAPIVersion": "split.smi-spec.io/v1alpha1", "objects": [v2]}});
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (status, body) = exchange(
        TokioIo::new(tcp),
        Method::POST,
        "/convert",
        serde_json::to_vec(&review).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        success(&answer)[0]["spec"]["backends"],
        json!([{"service": "a", "weight": "3"}])
    );
    task.abort();
}

#[tokio::test]
async fn a_renewed_certificate_is_served_and_a_broken_one_is_not() {
    let server = start_https().await;
    let v4 = split(
        "v1alpha4",
        "tls",
        json!([{"service": "a", "weight": 1}]),
        None,
    );
    let (_, _, first) = https(&server, Method::POST, "/other", Vec::new()).await;

    // Renewal (same CA, new key), picked up by the poller.
    let reloader = server.cert.spawn_reloader(Duration::from_millis(50));
    let renewed = server
        .issuer
        .write_leaf(&server.cert_path(), &server.key_path());
    assert_ne!(renewed, first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, _, presented) = https(&server, Method::POST, "/other", Vec::new()).await;
        if presented == renewed {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "renewed certificate not served within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reloader.abort();

    // A key that does not match the certificate: reported, and the renewed pair keeps serving.
    let other_dir = tempfile::tempdir().unwrap();
    let (other_cert, other_key) = (other_dir.path().join("c"), other_dir.path().join("k"));
    server.issuer.write_leaf(&other_cert, &other_key);
    std::fs::copy(&other_key, server.key_path()).unwrap();
    let error = server.cert.reload().unwrap_err().to_string();
    assert!(
        error.contains("does not belong to the certificate in"),
        "{error}"
    );
    std::fs::write(server.cert_path(), "not pem").unwrap();
    let error = server.cert.reload().unwrap_err().to_string();
    assert!(
        error.contains("tls.crt: no PEM CERTIFICATE block"),
        "{error}"
    );
    let (_, _, presented) = https(&server, Method::POST, "/other", Vec::new()).await;
    assert_eq!(presented, renewed);
    success(&convert(&server, "split.smi-spec.io/v1alpha3", &[v4]).await);

    // Loading a broken pair at start names the file.
    let error = ReloadingCert::load(server.cert_path(), server.key_path()).unwrap_err();
    assert!(
        error.to_string().contains("no PEM CERTIFICATE block"),
        "{error}"
    );
}

#[test]
fn the_generated_crds_send_conversions_to_the_served_path() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crds");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let crd: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let conversion = &crd["spec"]["conversion"];
        if crd["spec"]["group"] == "policy.trellis.io" {
            assert!(conversion.is_null(), "TrafficPolicy has one version");
            continue;
        }
        assert_eq!(conversion["strategy"], "Webhook", "{}", path.display());
        assert_eq!(
            conversion["webhook"]["clientConfig"]["service"]["path"],
            webhook::PATH,
            "{}",
            path.display()
        );
        assert_eq!(webhook::PATH, "/convert");
        assert_eq!(
            conversion["webhook"]["conversionReviewVersions"],
            json!(["v1"])
        );
        checked += 1;
    }
    assert_eq!(checked, 5, "one CRD per SMI kind in {}", dir.display());
}
