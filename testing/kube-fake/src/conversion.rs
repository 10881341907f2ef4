//! CRD version conversion as the API server does it: through the CRD's conversion webhook.
//!
//! When the store holds a CustomResourceDefinition (`apiextensions.k8s.io/v1`) for a request's
//! group and plural, and the request is at a version other than the CRD's storage version, the
//! objects are kept at the storage version and converted on the way in and out:
//!
//! - strategy `Webhook`: a `ConversionReview` (v1) is POSTed to `clientConfig.url` over HTTPS,
//!   trusting exactly `clientConfig.caBundle`, with all the objects of the request in one review
//!   (a list converts its items in one call, as the API server does); a failure is a 500
//!   `InternalError` whose message starts like the real one (`conversion webhook for
//!   split.smi-spec.io/v1alpha4, Kind=TrafficSplit failed: ...`); a webhook answering
//!   `Failure` passes its message on;
//! - strategy `None`: only `apiVersion` changes.
//!
//! Reads (GET, LIST) convert storage -> requested; writes (POST, PUT) convert requested ->
//! storage, store, and answer at the requested version; a merge PATCH is applied to the object
//! at the requested version (as the real server does) and stored converted; DELETE answers the
//! deleted object converted. A `clientConfig.service` cannot be reached from here (no cluster
//! network): such a CRD gets the same 500 a real server gives for an unreachable service.
//!
//! Simplification: WATCH at a version other than the storage version is refused with 400 and
//! a message saying so (nothing in Trellis or Flagger watches SMI objects at another version).
//! Without a CRD object in the store, every registered version is its own independent store
//! (the behaviour tests that predate this module rely on).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};

use crate::ApiError;
use crate::resources::ResourceType;
use crate::store::Store;

/// How long a webhook call may take (the API server's default timeout for conversion).
const TIMEOUT: Duration = Duration::from_secs(30);

/// How a request's version relates to storage.
#[derive(Clone, Debug)]
pub(crate) struct Conversion {
    /// The type objects are stored as.
    pub storage: ResourceType,
    /// `group/version` the request speaks.
    pub requested: String,
    strategy: Strategy,
}

#[derive(Clone, Debug)]
enum Strategy {
    None,
    Webhook {
        url: Option<String>,
        ca_bundle: Vec<u8>,
    },
}

/// The conversion `resource` needs, if a stored CRD says it is not the storage version.
pub(crate) fn lookup(store: &Store, resource: &ResourceType) -> Option<Conversion> {
    if resource.group.is_empty() {
        return None;
    }
    let crd_type = store.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")?;
    let crd = store
        .get(
            &crd_type,
            "",
            &format!("{}.{}", resource.plural, resource.group),
        )
        .ok()?;
    let spec = crd.get("spec")?;
    let storage_version = spec
        .get("versions")?
        .as_array()?
        .iter()
        .find(|v| v.get("storage").and_then(Value::as_bool) == Some(true))?
        .get("name")?
        .as_str()?;
    if storage_version == resource.version {
        return None;
    }
    let storage = store.resource(&resource.group, storage_version, &resource.plural)?;
    let conversion = spec.get("conversion");
    let strategy = match conversion
        .and_then(|c| c.get("strategy"))
        .and_then(Value::as_str)
    {
        Some("Webhook") => {
            let config = conversion
                .and_then(|c| c.pointer("/webhook/clientConfig"))
                .cloned()
                .unwrap_or(Value::Null);
            let ca_bundle = config
                .get("caBundle")
                .and_then(Value::as_str)
                .and_then(|b| serde_json::from_value::<k8s_openapi::ByteString>(json!(b)).ok())
                .map(|b| b.0)
                .unwrap_or_default();
            Strategy::Webhook {
                url: config.get("url").and_then(Value::as_str).map(str::to_owned),
                ca_bundle,
            }
        }
        _ => Strategy::None,
    };
    Some(Conversion {
        requested: resource.api_version(),
        storage,
        strategy,
    })
}

impl Conversion {
    /// Converts `objects` to `desired` (`group/version`).
    pub async fn convert(
        &self,
        objects: Vec<Value>,
        desired: &str,
    ) -> Result<Vec<Value>, ApiError> {
        if objects.is_empty() {
            return Ok(objects);
        }
        match &self.strategy {
            Strategy::None => Ok(objects
                .into_iter()
                .map(|mut object| {
                    object["apiVersion"] = json!(desired);
                    object
                })
                .collect()),
            Strategy::Webhook { url, ca_bundle } => {
                let failed = |why: String| {
                    ApiError::new(
                        500,
                        "InternalError",
                        format!(
                            "conversion webhook for {}, Kind={} failed: {why}",
                            self.storage.api_version(),
                            self.storage.kind
                        ),
                    )
                };
                let url = url.as_deref().ok_or_else(|| {
                    failed(
                        "the fake API server reaches only clientConfig.url webhooks (no cluster network for clientConfig.service)".into(),
                    )
                })?;
                let count = objects.len();
                let review = json!({
                    "apiVersion": "apiextensions.k8s.io/v1",
                    "kind": "ConversionReview",
                    "request": {
                        "uid": uid(),
                        "desiredAPIVersion": desired,
                        "objects": objects,
                    },
                });
                let answer = tokio::time::timeout(TIMEOUT, post(url, ca_bundle, &review))
                    .await
                    .map_err(|_| failed(format!("Post {url:?}: context deadline exceeded")))?
                    .map_err(|e| failed(format!("Post {url:?}: {e}")))?;
                let response = answer
                    .get("response")
                    .ok_or_else(|| failed("the ConversionReview answer has no response".into()))?;
                if response.get("uid") != review.pointer("/request/uid") {
                    return Err(failed(
                        "the response uid does not match the request uid".into(),
                    ));
                }
                if response.pointer("/result/status").and_then(Value::as_str) != Some("Success") {
                    let message = response
                        .pointer("/result/message")
                        .and_then(Value::as_str)
                        .unwrap_or("no message");
                    return Err(failed(format!("conversion failed: {message}")));
                }
                let converted = response
                    .get("convertedObjects")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                if converted.len() != count {
                    return Err(failed(format!(
                        "expected {count} converted objects, got {}",
                        converted.len()
                    )));
                }
                if let Some(wrong) = converted
                    .iter()
                    .find(|o| o.get("apiVersion").and_then(Value::as_str) != Some(desired))
                {
                    return Err(failed(format!(
                        "converted object has apiVersion {}, expected {desired}",
                        wrong["apiVersion"]
                    )));
                }
                Ok(converted)
            }
        }
    }

    /// One object to `desired`.
    pub async fn one(&self, object: Value, desired: &str) -> Result<Value, ApiError> {
        Ok(self
            .convert(vec![object], desired)
            .await?
            .pop()
            .expect("one in, one out (checked)"))
    }
}

/// A ConversionReview uid (unique enough for matching one request to its answer).
fn uid() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!(
        "00000000-0000-4000-8000-{:012x}",
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// POSTs `review` to `url` over HTTPS trusting `ca_bundle` (PEM); returns the JSON answer.
async fn post(
    url: &str,
    ca_bundle: &[u8],
    review: &Value,
) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
    let uri: hyper::Uri = url.parse()?;
    if uri.scheme_str() != Some("https") {
        return Err("webhooks are called over https only".into());
    }
    let host = uri.host().ok_or("no host")?.to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_bundle) {
        roots.add(cert?)?;
    }
    if roots.is_empty() {
        return Err("x509: certificate signed by unknown authority (empty caBundle)".into());
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let tcp = tokio::net::TcpStream::connect((bare.as_str(), port)).await?;
    let tls = connector
        .connect(ServerName::try_from(bare.clone())?, tcp)
        .await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(Method::POST)
        .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header("host", host)
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(review)?)))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        return Err(format!(
            "the server responded with {status}: {}",
            String::from_utf8_lossy(&body).trim()
        )
        .into());
    }
    Ok(serde_json::from_slice(&body)?)
}
