//! Clients of the gateway's HTTPS listener: server certificates for its hosts, TLS connections
//! with a chosen SNI name and ALPN, and a GET on one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::certs::Ca;
use super::{full, read};

/// A server certificate for DNS `names`, signed by `ca`: (cert PEM, key PEM).
pub fn server_cert(ca: &Ca, names: &[&str]) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(60)).into();
    params.not_after = (now + Duration::from_secs(3600)).into();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A TLS client trusting `ca`, offering `alpn`.
pub fn client(ca: &Ca, alpn: &[&[u8]]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca.der.clone())).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(trellis_proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

pub async fn connect(
    ca: &Ca,
    addr: SocketAddr,
    sni: &str,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    client(ca, alpn)
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
}

/// GET `path` over HTTP/1.1 on a TLS connection with SNI `sni`: status, `x-app` (or
/// `x-trellis-error`) and body.
pub async fn get(ca: &Ca, addr: SocketAddr, sni: &str, path: &str) -> (StatusCode, String, String) {
    let tls = connect(ca, addr, sni, &[b"http/1.1"]).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", sni)
        .body(full(""))
        .unwrap();
    read(sender.send_request(req).await.unwrap()).await
}
