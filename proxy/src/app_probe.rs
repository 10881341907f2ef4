//! Application probes through the admin port: `GET /app-probe/<container>/<kind>` runs the
//! app's original probe from inside the pod and answers for it.
//!
//! The sidecar injector rewrites a meshed pod's httpGet and tcpSocket probes to these paths and
//! hands the originals to the proxy (`--app-probes JSON` / `TRELLIS_PROXY_APP_PROBES`; the
//! format is [`trellis_intercept::app_probe`]'s, shared with the injector). Why: the kubelet
//! probes from outside the pod with no mesh identity, so the inbound proxy (deny by default)
//! would refuse it, and leaving the app's port out of interception instead would leave it open
//! without mTLS. The admin port is never intercepted.
//!
//! Answers:
//! - httpGet: `GET scheme://127.0.0.1:<port><path>` with the probe's headers, within the probe's
//!   `timeoutSeconds` (default 1 s, the kubelet's). A 2xx is passed on as it is; a 3xx becomes
//!   200 (a redirect is a success for the kubelet, and passing the `Location` on would send the
//!   kubelet to a path of the admin port); 4xx/5xx are passed on with the app's status. HTTPS
//!   probes do not verify the app's certificate, as the kubelet does not.
//! - tcpSocket: 200 when a connection to 127.0.0.1:`port` opens in time.
//! - no answer, refused, timed out: 503 with the reason in the body.
//! - a path that is not one of the given probes: 404 listing the probes known.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
pub use trellis_intercept::app_probe::{AppProbe, AppProbes, PATH_PREFIX};

/// Default bound on one probe (the kubelet's default `timeoutSeconds`).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// Parses `--app-probes`: the error says what is wrong in the JSON.
pub fn parse(json: &str) -> anyhow::Result<AppProbes> {
    let probes = trellis_intercept::app_probe::parse(json)
        .map_err(|e| anyhow::anyhow!("--app-probes: not the injector's probe JSON: {e}"))?;
    if let Some(path) = probes.keys().find(|p| !p.starts_with(PATH_PREFIX)) {
        anyhow::bail!("--app-probes: {path:?} does not start with {PATH_PREFIX}");
    }
    Ok(probes)
}

/// Answers `GET <path>` for one of `probes` (see the module docs).
pub async fn answer(probes: &AppProbes, path: &str) -> Response<Full<Bytes>> {
    let Some(probe) = probes.get(path) else {
        let known: Vec<&str> = probes.keys().map(String::as_str).collect();
        return text(
            StatusCode::NOT_FOUND,
            format!(
                "no app probe {path}; known: {}\n",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(" ")
                }
            ),
        );
    };
    let result = match probe {
        AppProbe::Tcp {
            tcp,
            timeout_seconds,
        } => {
            let timeout = bound(*timeout_seconds);
            match tokio::time::timeout(timeout, TcpStream::connect(("127.0.0.1", *tcp))).await {
                Ok(Ok(_)) => Ok((StatusCode::OK, format!("connected to 127.0.0.1:{tcp}\n"))),
                Ok(Err(e)) => Err(format!("connecting to 127.0.0.1:{tcp}: {e}")),
                Err(_) => Err(format!(
                    "connecting to 127.0.0.1:{tcp}: no connection within {timeout:?}"
                )),
            }
        }
        AppProbe::Http {
            port,
            path: app_path,
            scheme,
            headers,
            timeout_seconds,
        } => {
            let timeout = bound(*timeout_seconds);
            let url = format!("{}://127.0.0.1:{port}{app_path}", scheme.to_lowercase());
            match tokio::time::timeout(timeout, http_get(*port, app_path, scheme, headers)).await {
                Ok(Ok(status)) if status.is_redirection() => Ok((
                    StatusCode::OK,
                    format!("{url} answered {status} (a redirect counts as success)\n"),
                )),
                Ok(Ok(status)) => Ok((status, format!("{url} answered {status}\n"))),
                Ok(Err(e)) => Err(format!("GET {url}: {e}")),
                Err(_) => Err(format!("GET {url}: no answer within {timeout:?}")),
            }
        }
    };
    match result {
        Ok((status, body)) => text(status, body),
        Err(reason) => {
            tracing::debug!(probe = path, "app probe failed: {reason}");
            text(StatusCode::SERVICE_UNAVAILABLE, reason + "\n")
        }
    }
}

fn bound(timeout_seconds: Option<u32>) -> Duration {
    timeout_seconds
        .filter(|s| *s > 0)
        .map_or(DEFAULT_TIMEOUT, |s| Duration::from_secs(u64::from(s)))
}

/// One HTTP/1.1 GET on a new connection; the app's status.
async fn http_get(
    port: u16,
    path: &str,
    scheme: &str,
    headers: &[trellis_intercept::app_probe::Header],
) -> anyhow::Result<StatusCode> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut request = Request::get(path)
        .header(header::HOST, format!("127.0.0.1:{port}"))
        .header(header::USER_AGENT, "trellis-proxy/app-probe")
        .header(header::ACCEPT, "*/*")
        .body(Empty::<Bytes>::new())?;
    for h in headers {
        // The probe's headers replace ours of the same name (a Host or User-Agent of its own).
        request.headers_mut().insert(
            header::HeaderName::from_bytes(h.name.as_bytes())?,
            header::HeaderValue::from_str(&h.value)?,
        );
    }
    if scheme.eq_ignore_ascii_case("https") {
        let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate))
            .with_no_client_auth();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost")?.to_owned(), stream)
            .await?;
        send(TokioIo::new(tls), request).await
    } else if scheme.eq_ignore_ascii_case("http") {
        send(TokioIo::new(stream), request).await
    } else {
        anyhow::bail!("scheme {scheme:?} is neither HTTP nor HTTPS")
    }
}

async fn send<I>(io: I, request: Request<Empty<Bytes>>) -> anyhow::Result<StatusCode>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    let connection = tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    let status = response.status();
    // Read the (small) body so that the app sees a complete exchange; ignore what it says.
    let _ = response.into_body().collect().await;
    connection.abort();
    Ok(status)
}

/// Accepts any certificate: the kubelet's HTTPS probes do not verify the app either, and the
/// connection never leaves the pod.
#[derive(Debug)]
struct AnyCertificate;

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &crate::tls::provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &crate::tls::provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        crate::tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
