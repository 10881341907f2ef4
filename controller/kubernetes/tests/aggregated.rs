//! The aggregated TrafficMetrics API over real HTTPS on loopback, as the API server's front
//! proxy calls it: the webhook server with [`AcceptAnyClientCert`], the front-proxy settings in
//! the fake API server's ConfigMap `kube-system/extension-apiserver-authentication` (a
//! request-header CA this test makes), SubjectAccessReviews answered by the fake API server's
//! grants, and a stub Prometheus answering every query with one series.
//!
//! Refused with 401: no client certificate, one from another CA, one from the request-header CA
//! with a common name not in `requestheader-allowed-names`, a metrics request naming no user.
//! Refused with 403: a user without a grant (and a grant for `get` does not allow `list`).
//! Allowed: discovery for the front proxy itself, and a granted user's `get`. The conversion
//! webhook on the same port still answers clients without certificates.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use trellis_controller_kubernetes::aggregated::{AcceptAnyClientCert, AggregatedApi};
use trellis_controller_kubernetes::webhook;
use trellis_kube_fake::{AccessRule, FakeApiServer};
use trellis_traffic_metrics::{MetricsApi, PREFIX};

struct Ca(CertifiedIssuer<'static, KeyPair>);

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Self(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

    fn pem(&self) -> String {
        self.0.pem()
    }

    /// A leaf: a server certificate for 127.0.0.1, or a client certificate named `cn`.
    fn leaf(&self, cn: &str, client: bool) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let sans = if client {
            Vec::new()
        } else {
            vec!["127.0.0.1".to_owned()]
        };
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = params.signed_by(&key, &self.0).unwrap();
        (
            cert.der().clone(),
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
    }
}

/// A Prometheus stand-in: every instant query gets one series of `test/web` with value 10.
async fn stub_prometheus() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |_req: Request<hyper::body::Incoming>| async {
                        let body = json!({"status": "success", "data": {"resultType": "vector", "result": [
                            {"metric": {"destination_namespace": "test", "destination_workload": "web"}, "value": [0, "10"]}
                        ]}});
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(body.to_string()),
                        )))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

struct Setup {
    addr: SocketAddr,
    server_ca: CertificateDer<'static>,
    api_server: FakeApiServer,
    front_proxy_ca: Ca,
    _task: tokio::task::JoinHandle<()>,
}

async fn setup() -> Setup {
    let api_server = FakeApiServer::start().await.unwrap();
    let client = trellis_testing::kubernetes::kube_client(&api_server);
    let front_proxy_ca = Ca::new("front-proxy-ca");
    let config_map: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "extension-apiserver-authentication", "namespace": "kube-system"},
        "data": {
            "requestheader-client-ca-file": front_proxy_ca.pem(),
            "requestheader-allowed-names": "[\"front-proxy-client\"]",
            "requestheader-username-headers": "[\"X-Remote-User\"]",
            "requestheader-group-headers": "[\"X-Remote-Group\"]",
            "requestheader-extra-headers-prefix": "[\"X-Remote-Extra-\"]",
        },
    }))
    .unwrap();
    Api::<ConfigMap>::namespaced(client.clone(), "kube-system")
        .create(&PostParams::default(), &config_map)
        .await
        .unwrap();
    let prometheus = stub_prometheus().await;
    let api = MetricsApi::new(&format!("http://{prometheus}")).unwrap();
    let handler: Arc<dyn webhook::Handler> = Arc::new(AggregatedApi::new(api, client));

    let serving_ca = Ca::new("serving-ca");
    let (cert, key) = serving_ca.leaf("trellis-controller", false);
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_client_cert_verifier(AcceptAnyClientCert::new())
    .with_single_cert(vec![cert], key)
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(webhook::serve_with(
        listener,
        Some(Arc::new(tls)),
        vec![handler],
    ));
    Setup {
        addr,
        server_ca: serving_ca.0.der().clone(),
        api_server,
        front_proxy_ca,
        _task: task,
    }
}

/// One HTTPS request with `identity` as the client certificate and `headers`.
async fn call(
    setup: &Setup,
    identity: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, Value) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(setup.server_ca.clone()).unwrap();
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
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(setup.addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "trellis-controller.trellis-system.svc");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&body)
        .unwrap_or_else(|_| json!({"text": String::from_utf8_lossy(&body)}));
    (status, json)
}

#[tokio::test]
async fn only_the_front_proxy_with_an_allowed_user_gets_metrics() {
    let setup = setup().await;
    let proxy = || setup.front_proxy_ca.leaf("front-proxy-client", true);
    let object = format!("{PREFIX}/namespaces/test/deployments/web");
    let alice = [("X-Remote-User", "alice"), ("X-Remote-Group", "viewers")];

    // Not the front proxy: 401.
    let stranger_ca = Ca::new("front-proxy-ca");
    for (what, identity) in [
        ("no certificate", None),
        (
            "another CA",
            Some(stranger_ca.leaf("front-proxy-client", true)),
        ),
        (
            "a name not allowed",
            Some(setup.front_proxy_ca.leaf("someone-else", true)),
        ),
    ] {
        let (status, body) = call(&setup, identity, Method::GET, &object, &alice).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
        assert_eq!(body["kind"], "Status", "{what}");
        assert_eq!(body["reason"], "Unauthorized", "{what}");
    }

    // The front proxy itself reads discovery; metrics need a user.
    let (status, body) = call(&setup, Some(proxy()), Method::GET, PREFIX, &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["kind"], "APIResourceList");
    let (status, body) = call(&setup, Some(proxy()), Method::GET, &object, &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");

    // A user with no grant: 403, saying who and what.
    let (status, body) = call(&setup, Some(proxy()), Method::GET, &object, &alice).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("\"alice\"") && message.contains("get") && message.contains("\"test\""),
        "{message}"
    );

    // Granted to her group, in that namespace: the metrics.
    setup.api_server.grant(
        AccessRule::new("viewers", &["get"], "metrics.smi-spec.io", &["deployments"])
            .in_namespace("test"),
    );
    let (status, body) = call(&setup, Some(proxy()), Method::GET, &object, &alice).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["kind"], "TrafficMetrics");
    assert_eq!(body["resource"]["name"], "web");
    assert!(
        body["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "success_count"),
        "{body}"
    );
    // `get` is not `list`; another namespace is not granted.
    for path in [
        format!("{PREFIX}/namespaces/test/deployments"),
        format!("{PREFIX}/namespaces/other/deployments/web"),
    ] {
        let (status, body) = call(&setup, Some(proxy()), Method::GET, &path, &alice).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
    }
    // Read-only.
    let (status, _) = call(&setup, Some(proxy()), Method::POST, &object, &alice).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);

    // The conversion webhook on the same port needs no client certificate.
    let (status, body) = call(&setup, None, Method::POST, "/convert", &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

/// Against a real API server (`TRELLIS_TEST_KUBECONFIG`) where `trellis install --prometheus`
/// registered the APIService and the controller runs: what `kubectl get --raw
/// /apis/metrics.smi-spec.io/v1alpha1[/namespaces]` shows, through the API server's
/// aggregation (its front proxy, our authentication, its RBAC in our SubjectAccessReview).
#[tokio::test]
async fn a_real_api_server_serves_the_group_through_aggregation() {
    let Ok(path) = std::env::var("TRELLIS_TEST_KUBECONFIG") else {
        eprintln!(
            "skipped: set TRELLIS_TEST_KUBECONFIG to a kubeconfig of a cluster with `trellis install --prometheus URL` applied"
        );
        return;
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("reading the kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("a usable kubeconfig");
    let client = kube::Client::try_from(config).unwrap();
    let services: Api<k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService> =
        Api::all(client.clone());
    let Some(service) = services
        .get_opt(trellis_traffic_metrics::API_SERVICE)
        .await
        .expect("reading APIServices")
    else {
        eprintln!(
            "skipped: no APIService {} in this cluster (install with `trellis install --prometheus URL --apply`)",
            trellis_traffic_metrics::API_SERVICE
        );
        return;
    };
    let available = service
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "Available");
    assert!(
        available.as_ref().is_some_and(|c| c.status == "True"),
        "the APIService is not Available: {available:?}"
    );
    let get = |path: String| {
        let client = client.clone();
        async move {
            let request = http::Request::get(&path).body(Vec::new()).unwrap();
            client
                .request_text(request)
                .await
                .map(|text| serde_json::from_str::<Value>(&text).unwrap())
        }
    };
    let discovery = get(PREFIX.to_owned()).await.expect("discovery");
    assert_eq!(discovery["kind"], "APIResourceList", "{discovery}");
    match get(format!("{PREFIX}/namespaces")).await {
        Ok(list) => assert_eq!(list["kind"], "TrafficMetricsList", "{list}"),
        // The kubeconfig's user may not be allowed: then the refusal is ours or RBAC's Status.
        Err(kube::Error::Api(status)) => {
            assert!(matches!(status.code, 403 | 503), "{status:?}");
            eprintln!("namespaces: {} {}", status.code, status.message);
        }
        Err(other) => panic!("{other}"),
    }
}
