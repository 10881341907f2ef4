//! The aggregated TrafficMetrics API served by the running `trellis controller` binary
//! (`--webhook --webhook-service NS/NAME --prometheus URL`) against the fake API server, as the
//! API server's aggregation layer uses it:
//!
//! - the leader writes the mesh's trust anchors as the `caBundle`, and the Service, into the
//!   APIService `v1alpha1.metrics.smi-spec.io`;
//! - an HTTPS client that trusts exactly that bundle for the Service's name, presenting a
//!   front-proxy certificate from the request-header CA of ConfigMap
//!   `kube-system/extension-apiserver-authentication`, reads discovery; without a certificate it
//!   gets 401; a user without a grant 403; a granted user reaches the API, which says
//!   Prometheus is unreachable (503: no Prometheus runs here; the metrics themselves are the
//!   conformance test `traffic_metrics`).
#![cfg(feature = "kubernetes")]

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::api::{Api, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use trellis_kube_fake::{AccessRule, ResourceType};
use trellis_testing::{
    ControllerProcess, controller_command, free_port, kube_client, poll_until as until,
    smi_api_server, write_kubeconfig,
};

const TRELLIS: &str = env!("CARGO_BIN_EXE_trellis");
const PREFIX: &str = "/apis/metrics.smi-spec.io/v1alpha1";
const SERVICE_HOST: &str = "trellis-controller.trellis-system.svc";

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

/// One HTTPS GET to the Service's name at `addr`, trusting exactly `bundle`.
async fn get(
    addr: SocketAddr,
    bundle: &[u8],
    identity: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, Value) {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(SERVICE_HOST).unwrap(), tcp)
        .await
        .expect("the served certificate chains to the APIService's caBundle for the Service");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut request = Request::get(path).header("host", SERVICE_HOST);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[test]
fn the_controller_serves_the_aggregated_api_to_the_front_proxy_only() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = runtime.block_on(smi_api_server());
    let crd_type = ResourceType::of::<CustomResourceDefinition>(false);
    let api_service_type = ResourceType::of::<APIService>(false);
    server.register(crd_type.clone());
    server.register(api_service_type.clone());
    for generated in trellis_smi::crd::generate() {
        server
            .store()
            .apply(&crd_type, serde_json::to_value(&generated.crd).unwrap())
            .unwrap();
    }
    // What `trellis install --prometheus` renders (no caBundle: the controller's to write).
    server
        .store()
        .apply(
            &api_service_type,
            json!({
                "apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
                "metadata": {"name": "v1alpha1.metrics.smi-spec.io"},
                "spec": {"group": "metrics.smi-spec.io", "version": "v1alpha1",
                         "groupPriorityMinimum": 100, "versionPriority": 100,
                         "service": {"namespace": "trellis-system", "name": "trellis-controller", "port": 443}},
            }),
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The mesh CA: one anchor that is also the issuer.
    let anchor_key = KeyPair::generate().unwrap();
    let anchor = ca_params("traffic metrics test anchor")
        .self_signed(&anchor_key)
        .unwrap();
    std::fs::write(dir.path().join("anchors.pem"), anchor.pem()).unwrap();
    std::fs::write(dir.path().join("issuer.key"), anchor_key.serialize_pem()).unwrap();
    // The API server's front-proxy CA and client certificate.
    let front_key = KeyPair::generate().unwrap();
    let front_params = ca_params("front-proxy-ca");
    let front_ca = front_params.self_signed(&front_key).unwrap();
    let front_issuer = Issuer::new(front_params, front_key);
    let proxy_identity = || {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "front-proxy-client");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &front_issuer).unwrap();
        (
            cert.der().clone(),
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
    };
    let kubeconfig = dir.path().join("kubeconfig");
    write_kubeconfig(&server, &kubeconfig).unwrap();
    let _runtime_context = runtime.enter();
    let client = kube_client(&server);
    let config_map: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "extension-apiserver-authentication", "namespace": "kube-system"},
        "data": {
            "requestheader-client-ca-file": front_ca.pem(),
            "requestheader-allowed-names": "[\"front-proxy-client\"]",
        },
    }))
    .unwrap();
    runtime
        .block_on(
            Api::<ConfigMap>::namespaced(client.clone(), "kube-system")
                .create(&PostParams::default(), &config_map),
        )
        .unwrap();

    let port = free_port();
    let prometheus = format!("http://127.0.0.1:{}", free_port());
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let _controller = ControllerProcess::spawn(
        controller_command(TRELLIS)
            .env("KUBECONFIG", &kubeconfig)
            .args(["--platform", "kubernetes", "--leader-elect=false"])
            .args(["--trust-anchor", &path("anchors.pem")])
            .args(["--issuer-cert", &path("anchors.pem")])
            .args(["--issuer-key", &path("issuer.key")])
            .args(["--webhook", &format!("127.0.0.1:{port}")])
            .args(["--webhook-service", "trellis-system/trellis-controller"])
            .args(["--prometheus", &prometheus])
            .stderr(std::process::Stdio::piped()),
    );

    // 1. The leader writes the bundle and the Service into the APIService.
    let services: Api<APIService> = Api::all(client.clone());
    let spec = until("the APIService's caBundle", 20, || {
        let spec = runtime
            .block_on(services.get("v1alpha1.metrics.smi-spec.io"))
            .ok()?
            .spec?;
        spec.ca_bundle.is_some().then_some(spec)
    });
    let bundle = spec.ca_bundle.unwrap().0;
    assert_eq!(String::from_utf8(bundle.clone()).unwrap(), anchor.pem());
    let reference = spec.service.unwrap();
    assert_eq!(
        (
            reference.namespace.as_deref(),
            reference.name.as_deref(),
            reference.port
        ),
        (
            Some("trellis-system"),
            Some("trellis-controller"),
            Some(443)
        )
    );
    assert_eq!(spec.insecure_skip_tls_verify, Some(false));

    // 2. Only the front proxy; only allowed users.
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let object = format!("{PREFIX}/namespaces/test/deployments/web");
    let alice = [("X-Remote-User", "alice")];
    runtime.block_on(async {
        let (status, body) = get(addr, &bundle, None, PREFIX, &[]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        let (status, body) = get(addr, &bundle, Some(proxy_identity()), PREFIX, &[]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["kind"], "APIResourceList");
        let (status, body) = get(addr, &bundle, Some(proxy_identity()), &object, &alice).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        server.grant(AccessRule::new(
            "alice",
            &["get"],
            "metrics.smi-spec.io",
            &["deployments"],
        ));
        let (status, body) = get(addr, &bundle, Some(proxy_identity()), &object, &alice).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains(prometheus.trim_start_matches("http://")),
            "{body}"
        );
    });
}
