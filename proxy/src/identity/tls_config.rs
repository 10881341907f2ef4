//! The rustls configurations made from the workload's credentials: one [`TlsGeneration`] per
//! certificate (the server configuration, client certificates required, and the outbound client
//! configurations cached per (expected identity, ALPN)), the SPIFFE verifiers, and the one
//! crypto provider (ring). The connections themselves are made in [`crate::tls`].

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};

use super::{Credentials, IdentityError, spiffe_id_of};

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
    /// `h2`, then `http/1.1`: the server chooses (TLS this proxy originates to servers outside
    /// the mesh, whose HTTP/2 support is not known in advance).
    Any,
}

impl Alpn {
    /// The protocol names offered, in order of preference.
    pub fn protocols(self) -> Vec<Vec<u8>> {
        match self {
            Alpn::H2 => vec![ALPN_H2.to_vec()],
            Alpn::Http1 => vec![ALPN_HTTP1.to_vec()],
            Alpn::None => Vec::new(),
            Alpn::Any => vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()],
        }
    }
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
        server.alpn_protocols = Alpn::Any.protocols();
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
        config.alpn_protocols = alpn.protocols();
        let config = Arc::new(config);
        clients.insert((expected.to_string(), alpn), Arc::clone(&config));
        Ok(config)
    }
}
