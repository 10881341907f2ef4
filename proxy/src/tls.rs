//! Mutual TLS connections between proxies with rustls (ring provider, TLS 1.3 only, ALPN `h2`
//! and `http/1.1`), made with the configurations of the workload's current certificate
//! ([`crate::identity::tls_config`], re-exported here).
//!
//! * Inbound ([`accept`]): the client must present a certificate that chains to the trust
//!   anchors (rustls' `WebPkiClientVerifier`) and names exactly one SPIFFE id; that id becomes
//!   the caller's identity for authorization.
//! * Outbound ([`connect`], [`MeshConnector`]): the server's chain must verify to the anchors AND
//!   its URI SAN must equal the identity the controller gave for the endpoint
//!   ([`SpiffeServerVerifier`]). There is deliberately no DNS name check: SPIFFE certificates
//!   carry no DNS names (the workload is named by its URI SAN, and addresses change with every
//!   pod), so the identity check replaces the hostname check.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::CertificateError;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::identity::{IdentityStore, spiffe_id_of};
use crate::metrics::Metrics;

pub use crate::identity::tls_config::{
    ALPN_H2, ALPN_HTTP1, Alpn, SpiffeServerVerifier, TlsGeneration, provider, verify_chain,
};

/// Why an mTLS connection could not be made or accepted.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// An identity source is configured but holds no valid certificate (fail closed).
    #[error("this proxy has no valid certificate yet")]
    NoIdentity,
    /// TCP connect failed.
    #[error("connect: {0}")]
    Connect(Box<dyn std::error::Error + Send + Sync>),
    /// The handshake took too long.
    #[error("TLS handshake timed out")]
    Timeout,
    /// The peer's certificate names another identity (or none).
    #[error("the peer's certificate does not name the expected identity")]
    IdentityMismatch,
    /// The handshake failed otherwise.
    #[error("TLS handshake failed: {0}")]
    Handshake(io::Error),
}

impl TlsError {
    /// Short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            TlsError::NoIdentity => "no-identity",
            TlsError::Connect(_) => "connect",
            TlsError::Timeout => "timeout",
            TlsError::IdentityMismatch => "identity-mismatch",
            TlsError::Handshake(e) => io_reason(e),
        }
    }
}

/// Metric reason for a handshake I/O error.
pub fn io_reason(e: &io::Error) -> &'static str {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return if e.kind() == io::ErrorKind::UnexpectedEof {
            "eof"
        } else {
            "io"
        };
    };
    use rustls::Error as R;
    match tls {
        R::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "expired",
        R::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => "not-yet-valid",
        R::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown-issuer",
        R::InvalidCertificate(CertificateError::ApplicationVerificationFailure) => {
            "identity-mismatch"
        }
        R::InvalidCertificate(_) => "bad-certificate",
        R::NoCertificatesPresented => "no-client-certificate",
        R::AlertReceived(_) => "alert-received",
        R::PeerIncompatible(_) => "incompatible",
        R::NoApplicationProtocol => "alpn",
        _ => "protocol",
    }
}

fn is_mismatch(e: &io::Error) -> bool {
    matches!(
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure
        ))
    )
}

fn server_name(address: &str) -> ServerName<'static> {
    let host = address
        .rsplit_once(':')
        .map_or(address, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .unwrap_or_else(|_| ServerName::try_from("trellis.mesh").expect("a valid DNS name"))
}

/// Client side: TLS over `tcp` towards `address`, accepting only `expected`.
pub async fn connect(
    store: &IdentityStore,
    metrics: &Metrics,
    expected: &str,
    address: &str,
    tcp: TcpStream,
    alpn: Alpn,
    timeout: Duration,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, TlsError> {
    let Some(generation) = store.current() else {
        metrics.tls_error("outbound", "no-identity");
        return Err(TlsError::NoIdentity);
    };
    let config = generation
        .client_config(expected, alpn)
        .map_err(|e| TlsError::Handshake(io::Error::other(e)))?;
    let started = Instant::now();
    let handshake = tokio_rustls::TlsConnector::from(config).connect(server_name(address), tcp);
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(tls)) => {
            metrics.tls_handshake("outbound", started.elapsed());
            Ok(tls)
        }
        Ok(Err(e)) => {
            metrics.tls_error("outbound", io_reason(&e));
            if is_mismatch(&e) {
                Err(TlsError::IdentityMismatch)
            } else {
                Err(TlsError::Handshake(e))
            }
        }
        Err(_) => {
            metrics.tls_error("outbound", "timeout");
            Err(TlsError::Timeout)
        }
    }
}

/// Server side: complete the handshake (the caller bounds it with a timeout) and return the
/// stream with the client's SPIFFE id.
pub async fn accept<IO>(
    generation: &TlsGeneration,
    io: IO,
) -> io::Result<(tokio_rustls::server::TlsStream<IO>, String)>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let tls = tokio_rustls::TlsAcceptor::from(generation.server_config())
        .accept(io)
        .await?;
    let id = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| io::Error::other(rustls::Error::NoCertificatesPresented))
        .and_then(|leaf| spiffe_id_of(leaf).map_err(io::Error::other))?;
    Ok((tls, id.to_string()))
}

/// A hyper connector that speaks mTLS to endpoints of one expected identity (one connection
/// pool per identity, so pooled connections are keyed by (address, identity)), or TLS this
/// proxy originates to a destination outside the mesh ([`MeshConnector::origin`]).
#[derive(Debug, Clone)]
pub struct MeshConnector {
    http: crate::connect::PlainConnector,
    peer: Peer,
    metrics: Metrics,
    timeout: Duration,
}

/// Who is at the other end of a [`MeshConnector`]'s connections.
#[derive(Debug, Clone)]
enum Peer {
    /// Another proxy, named by its SPIFFE id: mutual TLS with this workload's certificate.
    Mesh {
        store: Arc<IdentityStore>,
        expected: Arc<str>,
        alpn: Alpn,
    },
    /// A server outside the mesh: TLS with its host name checked against the configured roots,
    /// no client certificate (the outside does not know mesh identities).
    Origin {
        config: Arc<rustls::ClientConfig>,
        server_name: ServerName<'static>,
    },
}

impl MeshConnector {
    /// A connector towards `expected`.
    pub fn new(
        http: crate::connect::PlainConnector,
        store: Arc<IdentityStore>,
        metrics: Metrics,
        expected: &str,
        alpn: Alpn,
        timeout: Duration,
    ) -> Self {
        MeshConnector {
            http,
            peer: Peer::Mesh {
                store,
                expected: Arc::from(expected),
                alpn,
            },
            metrics,
            timeout,
        }
    }

    /// A connector originating TLS with `config` to servers named `server_name` (outside the
    /// mesh: see [`crate::external`]).
    pub fn origin(
        http: crate::connect::PlainConnector,
        config: Arc<rustls::ClientConfig>,
        server_name: ServerName<'static>,
        metrics: Metrics,
        timeout: Duration,
    ) -> Self {
        MeshConnector {
            http,
            peer: Peer::Origin {
                config,
                server_name,
            },
            metrics,
            timeout,
        }
    }
}

impl tower::Service<Uri> for MeshConnector {
    type Response = MeshStream;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = Result<MeshStream, TlsError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), TlsError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut this = self.clone();
        Box::pin(async move {
            if let Peer::Mesh { store, .. } = &this.peer
                && store.current().is_none()
            {
                this.metrics.tls_error("outbound", "no-identity");
                return Err(TlsError::NoIdentity);
            }
            let address = uri.authority().map_or("", |a| a.as_str()).to_string();
            let (tcp, permit) = tower::Service::call(&mut this.http, uri)
                .await
                .map_err(TlsError::Connect)?
                .into_parts();
            let tls = match &this.peer {
                Peer::Mesh {
                    store,
                    expected,
                    alpn,
                } => {
                    connect(
                        store,
                        &this.metrics,
                        expected,
                        &address,
                        tcp,
                        *alpn,
                        this.timeout,
                    )
                    .await?
                }
                Peer::Origin {
                    config,
                    server_name,
                } => {
                    originate(
                        config,
                        server_name.clone(),
                        &this.metrics,
                        tcp,
                        this.timeout,
                    )
                    .await?
                }
            };
            Ok(MeshStream(TokioIo::new(tls), permit))
        })
    }
}

/// Client side of TLS this proxy originates to a server outside the mesh: `config` checks the
/// server's chain and that it names `server_name` (rustls' WebPKI verifier).
pub async fn originate(
    config: &Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
    metrics: &Metrics,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, TlsError> {
    let started = Instant::now();
    let handshake = tokio_rustls::TlsConnector::from(Arc::clone(config)).connect(server_name, tcp);
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(tls)) => {
            metrics.tls_handshake("origin", started.elapsed());
            Ok(tls)
        }
        Ok(Err(e)) => {
            metrics.tls_error("origin", io_reason(&e));
            Err(TlsError::Handshake(e))
        }
        Err(_) => {
            metrics.tls_error("origin", "timeout");
            Err(TlsError::Timeout)
        }
    }
}

/// An mTLS connection to an upstream proxy.
#[derive(Debug)]
pub struct MeshStream(
    TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    /// The connection's place under the destination's circuit breaker, if it has one.
    #[allow(dead_code)]
    Option<crate::resilience::breaker::ConnectionPermit>,
);

impl crate::connect::Negotiated for MeshStream {
    fn negotiated_h2(&self) -> bool {
        let (_, session) = self.0.inner().get_ref();
        session.alpn_protocol() == Some(ALPN_H2)
    }
}

impl hyper::rt::Read for MeshStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for MeshStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// Find a [`TlsError`] in an error's source chain.
pub fn find_tls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a TlsError> {
    find_cause(e)
}

/// The first error of type `T` in `e`'s source chain, `e` included (a connector's or a body's
/// own error, under the client's).
pub fn find_cause<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = current {
        if let Some(t) = err.downcast_ref::<T>() {
            return Some(t);
        }
        current = err.source();
    }
    None
}
