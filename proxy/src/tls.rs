//! Mutual TLS between proxies with rustls (ring provider, TLS 1.3 only, ALPN `h2` and
//! `http/1.1`).
//!
//! * Inbound ([`accept`]): the client must present a certificate that chains to the trust
//!   anchors (rustls' `WebPkiClientVerifier`) and names exactly one SPIFFE id; that id becomes
//!   the caller's identity for authorization.
//! * Outbound ([`connect`], [`MeshConnector`]): the server's chain must verify to the anchors AND
//!   its URI SAN must equal the identity the controller gave for the endpoint
//!   ([`SpiffeServerVerifier`]). There is deliberately no DNS name check: SPIFFE certificates
//!   carry no DNS names (the workload is named by its URI SAN, and addresses change with every
//!   pod), so the identity check replaces the hostname check.
//!
//! Configurations are built once per certificate ([`TlsGeneration`]); outbound client
//! configurations are cached per (expected identity, ALPN) within a generation.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::identity::{Credentials, IdentityError, IdentityStore, spiffe_id_of};
use crate::metrics::Metrics;

/// ALPN ids.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN ids.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// The one crypto provider of the workspace: ring.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: LazyLock<Arc<CryptoProvider>> =
        LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));
    Arc::clone(&PROVIDER)
}

fn trust_anchors(
    anchors: &[CertificateDer<'static>],
) -> Result<Vec<TrustAnchor<'static>>, rustls::Error> {
    anchors
        .iter()
        .map(|a| {
            webpki::anchor_from_trusted_cert(a)
                .map(|t| t.to_owned())
                .map_err(|e| rustls::Error::General(format!("bad trust anchor: {e}")))
        })
        .collect()
}

fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    rustls::Error::InvalidCertificate(match e {
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::BadDer | E::BadDerTime => CertificateError::BadEncoding,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    })
}

/// Verify that `chain` (leaf first) chains to one of `anchors` at `now`.
pub fn verify_chain(
    chain: &[CertificateDer<'static>],
    anchors: &[CertificateDer<'static>],
    now: UnixTime,
) -> Result<(), rustls::Error> {
    let anchors = trust_anchors(anchors)?;
    let leaf = chain
        .first()
        .ok_or(rustls::Error::NoCertificatesPresented)?;
    let cert = webpki::EndEntityCert::try_from(leaf).map_err(pki_error)?;
    cert.verify_for_usage(
        provider().signature_verification_algorithms.all,
        &anchors,
        &chain[1..],
        now,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map(|_| ())
    .map_err(pki_error)
}

/// Accepts only server chains that verify to the anchors and name `expected`.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    anchors: Arc<[TrustAnchor<'static>]>,
    expected: String,
}

impl SpiffeServerVerifier {
    /// A verifier accepting chains to `anchors` whose leaf names `expected`.
    pub fn new(anchors: &[CertificateDer<'static>], expected: &str) -> Result<Self, rustls::Error> {
        Ok(SpiffeServerVerifier {
            anchors: trust_anchors(anchors)?.into(),
            expected: expected.to_string(),
        })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        cert.verify_for_usage(
            provider().signature_verification_algorithms.all,
            &self.anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(pki_error)?;
        // No DNS name check (see the module docs): the SPIFFE id is what names the peer.
        match spiffe_id_of(end_entity) {
            Ok(id) if id.to_string() == self.expected => Ok(ServerCertVerified::assertion()),
            Ok(id) => {
                tracing::warn!(expected = %self.expected, presented = %id, "server certificate names another identity");
                Err(identity_mismatch())
            }
            Err(e) => {
                tracing::warn!(expected = %self.expected, error = %e, "server certificate has no usable SPIFFE id");
                Err(identity_mismatch())
            }
        }
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
            &provider().signature_verification_algorithms,
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
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn identity_mismatch() -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

/// rustls' WebPKI client verifier plus: the leaf must name exactly one SPIFFE id.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        spiffe_id_of(end_entity).map_err(|e| {
            tracing::debug!(error = %e, "client certificate without a usable SPIFFE id");
            identity_mismatch()
        })?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// TLS configurations built from one certificate.
#[derive(Debug)]
pub struct TlsGeneration {
    /// The credentials.
    pub credentials: Credentials,
    /// Their SPIFFE id as a metric label (made once per certificate, cloned per request).
    pub identity_label: crate::metrics::Label,
    server: Arc<ServerConfig>,
    anchors: Arc<[TrustAnchor<'static>]>,
    clients: Mutex<HashMap<(String, Alpn), Arc<ClientConfig>>>,
}

/// What a client connection offers in ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alpn {
    /// `h2`.
    H2,
    /// `http/1.1`.
    Http1,
    /// Nothing (opaque TCP).
    None,
}

impl TlsGeneration {
    /// Build the server configuration (client certificates required) from `credentials`.
    pub fn new(credentials: Credentials) -> Result<Self, IdentityError> {
        let mut roots = RootCertStore::empty();
        for anchor in &credentials.anchors {
            roots.add(anchor.clone())?;
        }
        let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier { inner }))
            .with_single_cert(credentials.chain.clone(), credentials.key())?;
        server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
        let anchors: Arc<[TrustAnchor<'static>]> = trust_anchors(&credentials.anchors)?.into();
        Ok(TlsGeneration {
            identity_label: crate::metrics::Label::from(credentials.id.to_string().as_str()),
            credentials,
            server: Arc::new(server),
            anchors,
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// The inbound configuration.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.server)
    }

    /// The outbound configuration that accepts only `expected`.
    pub fn client_config(
        &self,
        expected: &str,
        alpn: Alpn,
    ) -> Result<Arc<ClientConfig>, rustls::Error> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&(expected.to_string(), alpn)) {
            return Ok(Arc::clone(c));
        }
        let verifier = SpiffeServerVerifier {
            anchors: Arc::clone(&self.anchors),
            expected: expected.to_string(),
        };
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(self.credentials.chain.clone(), self.credentials.key())?;
        config.alpn_protocols = match alpn {
            Alpn::H2 => vec![ALPN_H2.to_vec()],
            Alpn::Http1 => vec![ALPN_HTTP1.to_vec()],
            Alpn::None => Vec::new(),
        };
        let config = Arc::new(config);
        clients.insert((expected.to_string(), alpn), Arc::clone(&config));
        Ok(config)
    }
}

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
/// pool per identity, so pooled connections are keyed by (address, identity)).
#[derive(Debug, Clone)]
pub struct MeshConnector {
    http: crate::connect::PlainConnector,
    store: Arc<IdentityStore>,
    metrics: Metrics,
    expected: Arc<str>,
    alpn: Alpn,
    timeout: Duration,
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
            store,
            metrics,
            expected: Arc::from(expected),
            alpn,
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
            if this.store.current().is_none() {
                this.metrics.tls_error("outbound", "no-identity");
                return Err(TlsError::NoIdentity);
            }
            let address = uri.authority().map_or("", |a| a.as_str()).to_string();
            let (tcp, permit) = tower::Service::call(&mut this.http, uri)
                .await
                .map_err(TlsError::Connect)?
                .into_parts();
            let tls = connect(
                &this.store,
                &this.metrics,
                &this.expected,
                &address,
                tcp,
                this.alpn,
                this.timeout,
            )
            .await?;
            Ok(MeshStream(TokioIo::new(tls), permit))
        })
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

impl Connection for MeshStream {
    fn connected(&self) -> Connected {
        let (_, session) = self.0.inner().get_ref();
        if session.alpn_protocol() == Some(ALPN_H2) {
            Connected::new().negotiated_h2()
        } else {
            Connected::new()
        }
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
