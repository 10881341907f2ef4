//! The SMI TrafficMetrics API as a Kubernetes aggregated API: the APIService
//! `v1alpha1.metrics.smi-spec.io` sends `/apis/metrics.smi-spec.io/...` to the controller's
//! HTTPS webhook port, where [`AggregatedApi`] (a [`crate::webhook::Handler`]) answers it with
//! [`trellis_traffic_metrics::MetricsApi`] once the caller is known and allowed.
//!
//! Authentication, as an aggregated API server must do it (the API server authenticated the
//! user and passes it on in headers, so only the API server itself may send those headers):
//! - the TLS port asks every client for a certificate ([`AcceptAnyClientCert`]: the handshake
//!   proves the client holds the key; the conversion and injection webhooks ignore it);
//! - per request, the chain must verify, for client authentication, against the request-header
//!   CA of ConfigMap `kube-system/extension-apiserver-authentication`
//!   (`requestheader-client-ca-file`), and its common name must be one of
//!   `requestheader-allowed-names` (any, when that list is empty, as in Kubernetes);
//! - the user is the first `requestheader-username-headers` header (`X-Remote-User`), the
//!   groups every `requestheader-group-headers` header (`X-Remote-Group`).
//!
//! The ConfigMap is read at the first request and again at most every minute
//! ([`REFRESH`]), so a rotated front-proxy CA is picked up. Without a valid front-proxy
//! certificate, or without a user on a metrics request: 401. Discovery (`/apis`, the group, the
//! version) needs the certificate only: the aggregator reads it for itself.
//!
//! Authorization: a SubjectAccessReview for the user and groups, verb `get` (an object, its
//! edges) or `list`, group `metrics.smi-spec.io`, resource the kind (`deployments`), in the
//! namespace asked about; not allowed: 403. Every refusal is a Kubernetes `Status`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::{Api, PostParams};
use rustls::DistinguishedName;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use trellis_traffic_metrics::{Answer, MetricsApi, Request as MetricsRequest};

/// How long a read of the front-proxy ConfigMap is used before it is read again.
pub const REFRESH: Duration = Duration::from_secs(60);

/// Where the API server publishes how aggregated servers authenticate it.
pub const CONFIG_MAP_NAMESPACE: &str = "kube-system";
pub const CONFIG_MAP_NAME: &str = "extension-apiserver-authentication";

/// The client's certificate chain (leaf first), put into each request's extensions by the
/// webhook server when the client sent one.
#[derive(Clone, Debug)]
pub struct ClientCertificates(pub Arc<Vec<CertificateDer<'static>>>);

/// A client certificate verifier that asks for a certificate, does not require one, and
/// accepts any chain at the handshake (the handshake signature is still checked, so the client
/// holds the key). The chain is verified per request, against the CA of that moment.
#[derive(Debug)]
pub struct AcceptAnyClientCert {
    provider: Arc<CryptoProvider>,
}

impl AcceptAnyClientCert {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        })
    }
}

impl ClientCertVerifier for AcceptAnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    // No hints: a Go client (the API server) then sends its certificate whatever its issuer.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Who the API server says is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

/// The request-header authentication settings of the cluster.
pub struct FrontProxy {
    verifier: Arc<dyn ClientCertVerifier>,
    allowed_names: Vec<String>,
    user_headers: Vec<String>,
    group_headers: Vec<String>,
}

impl std::fmt::Debug for FrontProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrontProxy")
            .field("allowed_names", &self.allowed_names)
            .field("user_headers", &self.user_headers)
            .field("group_headers", &self.group_headers)
            .finish_non_exhaustive()
    }
}

/// A JSON list of strings as the ConfigMap holds them (`["X-Remote-User"]`); absent: `default`.
fn string_list(data: &BTreeMap<String, String>, key: &str, default: &[&str]) -> Vec<String> {
    data.get(key)
        .and_then(|text| serde_json::from_str::<Vec<String>>(text).ok())
        .unwrap_or_else(|| default.iter().map(|s| (*s).to_owned()).collect())
}

impl FrontProxy {
    /// From the ConfigMap's data; fails when there is no usable request-header CA.
    pub fn from_data(data: &BTreeMap<String, String>) -> Result<Self, String> {
        let where_ = format!("ConfigMap {CONFIG_MAP_NAMESPACE}/{CONFIG_MAP_NAME}");
        let pem = data
            .get("requestheader-client-ca-file")
            .filter(|pem| !pem.trim().is_empty())
            .ok_or_else(|| {
                format!("{where_} has no requestheader-client-ca-file: the API server has no front-proxy CA (--requestheader-client-ca-file)")
            })?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| format!("{where_}: requestheader-client-ca-file: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("{where_}: requestheader-client-ca-file: {e}"))?;
        }
        if roots.is_empty() {
            return Err(format!(
                "{where_}: requestheader-client-ca-file holds no certificate"
            ));
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| format!("{where_}: requestheader-client-ca-file: {e}"))?;
        Ok(Self {
            verifier,
            allowed_names: string_list(data, "requestheader-allowed-names", &[]),
            user_headers: string_list(data, "requestheader-username-headers", &["X-Remote-User"]),
            group_headers: string_list(data, "requestheader-group-headers", &["X-Remote-Group"]),
        })
    }

    /// Checks the client's chain and common name; then the user from the headers (`None`: a
    /// valid front proxy that named no user).
    pub fn authenticate(
        &self,
        certificates: Option<&ClientCertificates>,
        headers: &HeaderMap,
    ) -> Result<Option<User>, String> {
        let chain = certificates
            .map(|c| c.0.as_slice())
            .filter(|c| !c.is_empty())
            .ok_or("no client certificate: only the API server's front proxy may call this API")?;
        self.verifier
            .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
            .map_err(|e| {
                format!("the client certificate is not from the request-header CA: {e}")
            })?;
        if !self.allowed_names.is_empty() {
            let name = common_name(&chain[0]).unwrap_or_default();
            if !self.allowed_names.contains(&name) {
                return Err(format!(
                    "the client certificate's common name {name:?} is not one of requestheader-allowed-names {:?}",
                    self.allowed_names
                ));
            }
        }
        let values = |names: &[String]| -> Vec<String> {
            names
                .iter()
                .flat_map(|name| headers.get_all(name.as_str()))
                .filter_map(|v| v.to_str().ok())
                .map(str::to_owned)
                .collect()
        };
        let Some(name) = values(&self.user_headers)
            .into_iter()
            .find(|u| !u.is_empty())
        else {
            return Ok(None);
        };
        Ok(Some(User {
            name,
            groups: values(&self.group_headers),
        }))
    }
}

fn common_name(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// The TrafficMetrics API behind authentication and authorization.
#[derive(Clone)]
pub struct AggregatedApi {
    inner: Arc<Inner>,
}

struct Inner {
    api: MetricsApi,
    client: Client,
    front_proxy: Mutex<Option<(Instant, Arc<FrontProxy>)>>,
}

impl std::fmt::Debug for AggregatedApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AggregatedApi")
            .field("api", &self.inner.api)
            .finish_non_exhaustive()
    }
}

impl AggregatedApi {
    /// `api` behind the cluster's request-header authentication and SubjectAccessReviews, read
    /// and made with `client`.
    pub fn new(api: MetricsApi, client: Client) -> Self {
        Self {
            inner: Arc::new(Inner {
                api,
                client,
                front_proxy: Mutex::new(None),
            }),
        }
    }

    /// The settings, read again when older than [`REFRESH`].
    async fn front_proxy(&self) -> Result<Arc<FrontProxy>, String> {
        if let Some((at, current)) = self
            .inner
            .front_proxy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            && at.elapsed() < REFRESH
        {
            return Ok(Arc::clone(current));
        }
        let config_maps: Api<ConfigMap> =
            Api::namespaced(self.inner.client.clone(), CONFIG_MAP_NAMESPACE);
        let map = config_maps.get(CONFIG_MAP_NAME).await.map_err(|e| {
            format!("reading ConfigMap {CONFIG_MAP_NAMESPACE}/{CONFIG_MAP_NAME}: {e}")
        })?;
        let front_proxy = Arc::new(FrontProxy::from_data(&map.data.unwrap_or_default())?);
        *self
            .inner
            .front_proxy
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), Arc::clone(&front_proxy)));
        Ok(front_proxy)
    }

    /// Whether `user` may do what `request` asks.
    async fn authorize(&self, user: &User, request: &MetricsRequest) -> Result<bool, String> {
        let Some((verb, kind, namespace)) = request.access() else {
            return Ok(true);
        };
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.name.clone()),
                groups: Some(user.groups.clone()),
                resource_attributes: Some(ResourceAttributes {
                    namespace: namespace.map(str::to_owned),
                    verb: Some(verb.to_owned()),
                    group: Some(trellis_traffic_metrics::GROUP.to_owned()),
                    version: Some(trellis_traffic_metrics::VERSION.to_owned()),
                    resource: Some(kind.plural().to_owned()),
                    name: request.name().map(str::to_owned),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let answer = Api::<SubjectAccessReview>::all(self.inner.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| format!("SubjectAccessReview: {e}"))?;
        Ok(answer.status.is_some_and(|s| s.allowed))
    }

    /// Answers one request (GET only).
    pub async fn respond(
        &self,
        method: &http::Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        certificates: Option<&ClientCertificates>,
    ) -> Answer {
        let front_proxy = match self.front_proxy().await {
            Ok(front_proxy) => front_proxy,
            Err(why) => {
                tracing::warn!("TrafficMetrics API: cannot authenticate callers: {why}");
                return Answer::status(StatusCode::UNAUTHORIZED, "Unauthorized", why);
            }
        };
        let user = match front_proxy.authenticate(certificates, headers) {
            Ok(user) => user,
            Err(why) => return Answer::status(StatusCode::UNAUTHORIZED, "Unauthorized", why),
        };
        if method != http::Method::GET {
            return Answer::status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!(
                    "{method} is not supported: the TrafficMetrics API is read-only (get, list)"
                ),
            );
        }
        let request = match MetricsRequest::parse(path, query) {
            Ok(request) => request,
            Err(answer) => return answer,
        };
        if let Some((verb, kind, namespace)) = request.access() {
            let Some(user) = user else {
                return Answer::status(
                    StatusCode::UNAUTHORIZED,
                    "Unauthorized",
                    "the front proxy named no user (X-Remote-User)",
                );
            };
            match self.authorize(&user, &request).await {
                Ok(true) => {}
                Ok(false) => {
                    return Answer::status(
                        StatusCode::FORBIDDEN,
                        "Forbidden",
                        format!(
                            "{} {:?} is forbidden: User {:?} cannot {verb} resource {:?} in API group {:?}{}",
                            trellis_traffic_metrics::GROUP,
                            kind.plural(),
                            user.name,
                            kind.plural(),
                            trellis_traffic_metrics::GROUP,
                            namespace
                                .map(|ns| format!(" in the namespace {ns:?}"))
                                .unwrap_or_else(|| " at the cluster scope".into())
                        ),
                    );
                }
                Err(why) => {
                    return Answer::status(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "ServiceUnavailable",
                        format!("cannot authorize: {why}"),
                    );
                }
            }
        }
        self.inner.api.answer(&request).await
    }
}

impl crate::webhook::Handler for AggregatedApi {
    fn path(&self) -> &str {
        trellis_traffic_metrics::PREFIX
    }

    fn matches(&self, path: &str) -> bool {
        trellis_traffic_metrics::handles(path)
    }

    fn call(&self, request: Request<Incoming>) -> BoxFuture<'static, Response<Full<Bytes>>> {
        let this = self.clone();
        Box::pin(async move {
            let certificates = request.extensions().get::<ClientCertificates>().cloned();
            this.respond(
                request.method(),
                request.uri().path(),
                request.uri().query(),
                request.headers(),
                certificates.as_ref(),
            )
            .await
            .into_response()
        })
    }
}
