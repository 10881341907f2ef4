//! Test certificates: a CA, SPIFFE leaves signed by it, and the PEM files plus the `identity:`
//! line of a proxy's static config that name them. Shared by the tests that run proxies under
//! mTLS (mtls.rs, observe.rs, tracing.rs); and HTTPS servers outside the mesh ([`tls_server`],
//! [`h2_tls_server`]: egress.rs and external.rs).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A test certificate authority.
pub struct Ca {
    pub issuer: Issuer<'static, KeyPair>,
    pub pem: String,
    pub der: Vec<u8>,
}

pub fn new_ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        der: cert.der().to_vec(),
        issuer: Issuer::new(params, key),
    }
}

pub fn leaf_params(id: &str, not_before: SystemTime, not_after: SystemTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params
}

/// A leaf for `id`, valid from `not_before` to `not_after`: (cert PEM, key PEM).
pub fn leaf(ca: &Ca, id: &str, not_before: SystemTime, not_after: SystemTime) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let cert = leaf_params(id, not_before, not_after)
        .signed_by(&key, &ca.issuer)
        .unwrap();
    (cert.pem(), key.serialize_pem())
}

pub fn valid_leaf(ca: &Ca, id: &str) -> (String, String) {
    let now = SystemTime::now();
    leaf(
        ca,
        id,
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    )
}

/// Write PEM files; returns the `identity:` YAML line naming them.
pub fn identity_yaml(
    dir: &Path,
    name: &str,
    (cert, key): &(String, String),
    anchors: &[&Ca],
) -> String {
    let write = |file: String, text: &str| -> PathBuf {
        let p = dir.join(file);
        std::fs::write(&p, text).unwrap();
        p
    };
    let cert = write(format!("{name}.crt"), cert);
    let key = write(format!("{name}.key"), key);
    let anchors: Vec<String> = anchors
        .iter()
        .enumerate()
        .map(|(i, ca)| {
            format!(
                "\"{}\"",
                write(format!("{name}-anchor{i}.crt"), &ca.pem).display()
            )
        })
        .collect();
    format!(
        "identity: {{cert: \"{}\", key: \"{}\", trust_anchors: [{}]}}\n",
        cert.display(),
        key.display(),
        anchors.join(", ")
    )
}

/// A server TLS configuration with a certificate for `host` signed by `ca`, offering `alpn`.
fn server_config(ca: &Ca, host: &str, alpn: &[&[u8]]) -> rustls::ServerConfig {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![host.to_string()])
        .unwrap()
        .signed_by(&key, &ca.issuer)
        .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    config
}

/// An HTTPS server at `addr` with a certificate for `host` signed by `ca`, answering `name`
/// over HTTP/1.1 (it offers no ALPN); counts the requests it answered.
pub async fn tls_server(
    addr: SocketAddr,
    ca: &Ca,
    host: &str,
    name: &'static str,
) -> Arc<AtomicUsize> {
    let config = server_config(ca, host, &[]);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    let count = answered.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{name}",
                    name.len()
                );
                let _ = tls.write_all(reply.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    answered
}

/// An HTTPS server at `addr` for `host` (signed by `ca`) that speaks only HTTP/2 (ALPN `h2`):
/// answers each request with its version, URI and `host` field (`-` when absent) and a
/// `grpc-status: 0` trailer, as a gRPC server outside the mesh would.
pub async fn h2_tls_server(addr: SocketAddr, ca: &Ca, host: &str) {
    use http_body_util::{BodyExt as _, Full};
    let config = server_config(ca, host, &[b"h2"]);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let host = req
                            .headers()
                            .get("host")
                            .map_or("-".to_string(), |h| h.to_str().unwrap().to_string());
                        let text = format!("{:?} {} host={host}", req.version(), req.uri());
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                        let body = Full::new(bytes::Bytes::from(text))
                            .map_err(|never| match never {})
                            .with_trailers(async move { Some(Ok(trailers)) });
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
            });
        }
    });
}
