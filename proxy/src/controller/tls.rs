//! TLS to the controller (`--controller https://HOST:PORT --controller-ca FILE`): the gRPC
//! channel that carries the bootstrap token, the CSR and every routing and authorization update
//! is encrypted, and the proxy talks only to a controller whose certificate chains to the mesh's
//! trust anchors (`FILE`, PEM) *and* names `HOST` (a DNS name or an IP address SAN, as rustls'
//! WebPKI verifier checks it). Without this, anyone on the path could read the token and feed
//! the proxy its own configuration.
//!
//! The connector is the channel's own (tonic's `connect_with_connector_lazy`), so the TLS
//! configuration and its errors are ours: each new connection re-reads the anchors file (a
//! rotated trust bundle is used from the next connection, no restart), and a certificate that
//! does not verify is logged at `error` saying what failed and what to check. The channel
//! retries like any unreachable controller: every watch backs off and the proxy keeps its last
//! configuration meanwhile.
//!
//! The anchors may also be given inline (`--controller-ca-pem PEM`, what the injector puts in a
//! pod's environment); those are fixed for the life of the process.
//!
//! TLS 1.3 only, ALPN `h2`, crypto from [`crate::tls::provider`] (ring, the workspace's one).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// How long the TLS handshake with the controller may take (the TCP connect has its own limit).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The controller's TLS settings: where its trust anchors are.
#[derive(Debug, Clone)]
pub struct ControllerTls {
    /// The mesh's trust anchors.
    pub anchors: Anchors,
}

/// Where the controller's trust anchors come from.
#[derive(Debug, Clone)]
pub enum Anchors {
    /// A PEM file (`--controller-ca`), re-read for every new connection (rotation).
    File(PathBuf),
    /// PEM text given inline (`--controller-ca-pem`, what the injector puts in a pod's
    /// environment); fixed for the life of the process.
    Pem(Arc<str>),
}

impl Anchors {
    fn load(&self) -> Result<RootCertStore, AnchorsError> {
        match self {
            Anchors::File(path) => load_anchors(path),
            Anchors::Pem(pem) => parse_anchors(pem.as_bytes(), "--controller-ca-pem".into()),
        }
    }

    /// How the flags name these anchors, for errors.
    fn describe(&self) -> String {
        match self {
            Anchors::File(path) => format!("--controller-ca {}", path.display()),
            Anchors::Pem(_) => "--controller-ca-pem".into(),
        }
    }
}

/// Anchors that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {problem}")]
pub struct AnchorsError {
    what: String,
    problem: String,
}

/// The certificates of the PEM file at `path` as a root store.
pub fn load_anchors(path: &Path) -> Result<RootCertStore, AnchorsError> {
    let what = format!("--controller-ca {}", path.display());
    let pem = std::fs::read(path).map_err(|e| AnchorsError {
        what: what.clone(),
        problem: format!("cannot read: {e}"),
    })?;
    parse_anchors(&pem, what)
}

/// The certificates of `pem` as a root store; `what` names the source in errors.
fn parse_anchors(pem: &[u8], what: String) -> Result<RootCertStore, AnchorsError> {
    let error = |problem: String| AnchorsError {
        what: what.clone(),
        problem,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(error(
            "no CERTIFICATE block (expected the mesh's trust anchors, PEM)".into(),
        ));
    }
    let mut roots = RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        roots
            .add(cert)
            .map_err(|e| error(format!("certificate {} is not a usable anchor: {e}", i + 1)))?;
    }
    Ok(roots)
}

/// Makes TLS connections to the controller for tonic's channel.
#[derive(Debug, Clone)]
pub struct Connector {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    tls: ControllerTls,
    /// The anchors of the last good read: used while the file is unreadable or half-written.
    last_good: Mutex<Arc<RootCertStore>>,
}

impl Connector {
    /// Reads the anchors once: an unusable file is a startup error.
    pub fn new(tls: ControllerTls) -> Result<Self, AnchorsError> {
        let roots = Arc::new(tls.anchors.load()?);
        Ok(Self {
            inner: Arc::new(Inner {
                tls,
                last_good: Mutex::new(roots),
            }),
        })
    }

    /// The anchors as the file holds them now (rotation), else the last good ones.
    fn anchors(&self) -> Arc<RootCertStore> {
        if let Anchors::Pem(_) = &self.inner.tls.anchors {
            // Inline anchors never change: no need to parse them again.
            return Arc::clone(
                &self
                    .inner
                    .last_good
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            );
        }
        let mut last = self
            .inner
            .last_good
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match self.inner.tls.anchors.load() {
            Ok(roots) => *last = Arc::new(roots),
            Err(e) => tracing::warn!("{e}; using the anchors read before"),
        }
        Arc::clone(&last)
    }

    fn config(&self) -> Arc<rustls::ClientConfig> {
        let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .with_root_certificates(self.anchors())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    /// TCP, then TLS verified against the anchors and the URL's host.
    async fn connect(self, uri: http::Uri) -> std::io::Result<TokioIo<TlsStream<TcpStream>>> {
        let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
        let host = uri
            .host()
            .ok_or_else(|| bad(format!("controller URL {uri} has no host")))?;
        // `[::1]` in a URL is the address `::1`.
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let name = ServerName::try_from(host.clone())
            .map_err(|e| bad(format!("controller host {host:?}: {e}")))?;
        let tcp = TcpStream::connect((host.as_str(), port)).await?;
        let _ = tcp.set_nodelay(true);
        let connector = TlsConnector::from(self.config());
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp)).await {
            Ok(Ok(tls)) => Ok(TokioIo::new(tls)),
            Ok(Err(e)) => {
                let message = format!(
                    "controller {host}:{port}: TLS handshake failed: {e} (the controller's certificate must chain to {} and name {host:?})",
                    self.inner.tls.anchors.describe()
                );
                tracing::error!(
                    "{message}; retrying with backoff, the last configuration stays in force"
                );
                Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    message,
                ))
            }
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "controller {host}:{port}: TLS handshake did not finish within {HANDSHAKE_TIMEOUT:?}"
                ),
            )),
        }
    }
}

impl tower::Service<http::Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = futures::future::BoxFuture<'static, std::io::Result<Self::Response>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(self.clone().connect(uri))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::controller::{Controller, ControllerOptions};

    #[test]
    fn unusable_anchor_files_say_which_file_and_why() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = load_anchors(&missing).unwrap_err().to_string();
        assert!(
            e.contains("--controller-ca") && e.contains("missing.pem") && e.contains("cannot read"),
            "{e}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = load_anchors(&empty).unwrap_err().to_string();
        assert!(e.contains("no CERTIFICATE block"), "{e}");
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::default()
            .self_signed(&key)
            .unwrap();
        let good = dir.path().join("anchors.pem");
        std::fs::write(&good, ca.pem()).unwrap();
        assert_eq!(load_anchors(&good).unwrap().len(), 1);
    }

    #[test]
    fn https_needs_anchors_and_anchors_need_https() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let anchors = dir.path().join("anchors.pem");
        std::fs::write(
            &anchors,
            rcgen::CertificateParams::default()
                .self_signed(&key)
                .unwrap()
                .pem(),
        )
        .unwrap();
        let tls = || {
            Some(ControllerTls {
                anchors: Anchors::File(anchors.clone()),
            })
        };
        let attempt = |url: &str, tls: Option<ControllerTls>| {
            let mut options = ControllerOptions::new(url, "shop/web");
            options.tls = tls;
            Controller::new(options, Config::default()).map(|_| ())
        };
        // Channels are lazy: building one needs no runtime and no controller.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        attempt("https://controller.mesh:8090", tls()).unwrap();
        let inline = std::fs::read_to_string(&anchors).unwrap();
        let pem = |pem: &str| {
            Some(ControllerTls {
                anchors: Anchors::Pem(Arc::from(pem)),
            })
        };
        attempt("https://controller.mesh:8090", pem(&inline)).unwrap();
        let e = attempt("https://controller.mesh:8090", pem("garbage"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--controller-ca-pem: no CERTIFICATE block"),
            "{e}"
        );
        attempt("http://127.0.0.1:8090", None).unwrap();
        for (url, tls, expected) in [
            (
                "https://controller.mesh:8090",
                None,
                "https needs --controller-ca FILE",
            ),
            (
                "http://controller.mesh:8090",
                tls(),
                "the URL is http://, which would be plaintext",
            ),
            ("ftp://controller.mesh", None, "scheme \"ftp\""),
        ] {
            let e = attempt(url, tls).unwrap_err().to_string();
            assert!(e.contains(url) && e.contains(expected), "{url}: {e}");
        }
    }
}
