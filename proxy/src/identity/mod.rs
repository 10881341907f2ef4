//! The proxy's workload identity: a SPIFFE X.509 certificate, its private key (in memory only)
//! and the trust anchors peers are verified against.
//!
//! Two sources fill the [`IdentityStore`]:
//!
//! * **Controller mode** ([`run_certifier`]): a fresh ECDSA P-256 key pair is generated in memory
//!   (rcgen), a CSR carrying the URI SAN `spiffe://TD/ns/NS/sa/NAME` is sent with
//!   `Identity.Certify` together with the proof read from `--identity-token-file` (re-read before
//!   every call: projected ServiceAccount tokens rotate). The answer is checked (the leaf names
//!   the id asked for, holds our public key and chains to the anchors it came with) before it is
//!   used. Renewal happens at 70% of the certificate's lifetime; on failure it retries with
//!   backoff while the current certificate keeps serving until it expires.
//! * **Static mode** ([`load_static`]): PEM files named in the YAML config
//!   (`identity: {cert, key, trust_anchors}`), reloaded with the config, for operators with their
//!   own PKI and for benchmarks.
//!
//! Each new certificate becomes a new [`TlsGeneration`] swapped in atomically: connections
//! opened afterwards use it, open ones keep the one they were made with. A store that has a
//! source but no valid certificate (none yet, or expired) makes mTLS fail closed.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use backon::BackoffBuilder;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use tokio::sync::watch;
use trellis_proxy_api::spiffe::{SpiffeId, SpiffeIdError};
use trellis_proxy_api::v1;
use trellis_proxy_api::v1::identity_client::IdentityClient;

use tls_config::TlsGeneration;

pub mod tls_config;

/// Renew when this share of the certificate's lifetime has passed.
pub const RENEW_AT: f64 = 0.7;
/// Never ask again sooner than this after a success (a CA issuing nearly expired certificates
/// must not be hammered).
const MIN_RENEW_DELAY: Duration = Duration::from_millis(500);

/// Why an identity could not be obtained or used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A certificate cannot be parsed.
    #[error("certificate: {0}")]
    Certificate(String),
    /// The leaf has no `spiffe://` URI SAN.
    #[error("the certificate has no spiffe:// URI SAN")]
    NoSpiffeId,
    /// The leaf has more than one `spiffe://` URI SAN.
    #[error("the certificate has {0} spiffe:// URI SANs (exactly one is allowed)")]
    SeveralSpiffeIds(usize),
    /// The SPIFFE URI is not of the Trellis form.
    #[error(transparent)]
    BadSpiffeId(#[from] SpiffeIdError),
    /// The controller answered for another identity.
    #[error("asked for {asked} but the certificate says {got}")]
    WrongIdentity {
        /// What was asked for.
        asked: String,
        /// What the certificate names.
        got: String,
    },
    /// The certificate does not hold our public key.
    #[error("the certificate does not certify the key pair this proxy generated")]
    WrongKey,
    /// The answer is incomplete or does not verify.
    #[error("invalid Certify answer: {0}")]
    InvalidAnswer(String),
    /// The key pair or CSR could not be made.
    #[error("making the CSR: {0}")]
    Csr(#[from] rcgen::Error),
    /// rustls refused the credentials.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The controller refused or could not answer.
    #[error("Identity.Certify failed: {0}")]
    Certify(#[from] tonic::Status),
    /// The controller did not answer in time.
    #[error("Identity.Certify timed out after {0:?}")]
    Timeout(Duration),
}

/// One certificate with its key and the trust anchors that go with it.
#[derive(Clone)]
pub struct Credentials {
    /// The SPIFFE id the leaf names.
    pub id: SpiffeId,
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// Trust anchors (roots) peers are verified against.
    pub anchors: Vec<CertificateDer<'static>>,
    /// Start of the leaf's validity.
    pub not_before: SystemTime,
    /// End of the leaf's validity.
    pub not_after: SystemTime,
    key: Arc<PrivateKeyDer<'static>>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key is a secret: never shown.
        f.debug_struct("Credentials")
            .field("id", &self.id.to_string())
            .field("chain_len", &self.chain.len())
            .field("anchors", &self.anchors.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// Check and assemble credentials: the leaf must carry exactly one Trellis SPIFFE id.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        anchors: Vec<CertificateDer<'static>>,
    ) -> Result<Self, IdentityError> {
        let leaf = chain
            .first()
            .ok_or_else(|| IdentityError::Certificate("the chain is empty".into()))?;
        let id = spiffe_id_of(leaf)?;
        let (not_before, not_after) = validity_of(leaf)?;
        if anchors.is_empty() {
            return Err(IdentityError::Certificate("no trust anchors".into()));
        }
        Ok(Credentials {
            id,
            chain,
            anchors,
            not_before,
            not_after,
            key: Arc::new(key),
        })
    }

    /// The private key (for building TLS configurations).
    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// Whether the leaf is valid at `now`. A `not_before` up to a minute ahead is tolerated:
    /// a fresh certificate from a CA whose clock runs slightly ahead is still ours to use (peers
    /// apply their own check).
    pub fn valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now + Duration::from_secs(60) && now < self.not_after
    }

    /// When to renew, for a certificate received at `received`: at [`RENEW_AT`] of the
    /// lifetime left then. Counted from receipt rather than from `not_before`, because CAs
    /// backdate `not_before` for clock skew (the controller by 2 minutes), which would make
    /// short-lived certificates look 70% used on arrival.
    pub fn renew_at(&self, received: SystemTime) -> SystemTime {
        let start = received.max(self.not_before);
        let left = self.not_after.duration_since(start).unwrap_or_default();
        start + left.mul_f64(RENEW_AT)
    }
}

/// The SPIFFE id of a certificate: exactly one `spiffe://` URI SAN, of the Trellis form.
pub fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId, IdentityError> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::Certificate(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Certificate(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u)
                if u.get(..7)
                    .is_some_and(|s| s.eq_ignore_ascii_case("spiffe:")) =>
            {
                Some(*u)
            }
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(IdentityError::NoSpiffeId),
        [one] => Ok(one.parse()?),
        several => Err(IdentityError::SeveralSpiffeIds(several.len())),
    }
}

fn validity_of(der: &[u8]) -> Result<(SystemTime, SystemTime), IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::Certificate(e.to_string()))?;
    let at = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    let v = cert.validity();
    Ok((at(v.not_before), at(v.not_after)))
}

fn public_key_of(der: &[u8]) -> Result<Vec<u8>, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::Certificate(e.to_string()))?;
    Ok(cert.public_key().raw.to_vec())
}

/// The static identity of the YAML config: PEM files.
pub fn load_static(files: &crate::config::StaticIdentity) -> Result<Credentials, IdentityError> {
    let chain = read_certs(&files.cert)?;
    let key = std::fs::read(&files.key).map_err(|source| IdentityError::Read {
        path: files.key.clone(),
        source,
    })?;
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| IdentityError::Pem {
        path: files.key.clone(),
        what: format!("no private key found: {e}"),
    })?;
    let mut anchors = Vec::new();
    for path in &files.trust_anchors {
        anchors.extend(read_certs(path)?);
    }
    Credentials::new(chain, key, anchors)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let pem = std::fs::read(path).map_err(|source| IdentityError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| IdentityError::Pem {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(IdentityError::Pem {
            path: path.to_path_buf(),
            what: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// The current identity, swapped atomically; readers never block.
#[derive(Debug, Default)]
pub struct IdentityStore {
    configured: AtomicBool,
    current: ArcSwapOption<TlsGeneration>,
    updates: watch::Sender<u64>,
}

impl IdentityStore {
    /// A store without a source: the proxy talks plaintext.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store whose source will deliver a certificate: until it does, mTLS fails closed.
    pub fn expecting() -> Self {
        let store = Self::default();
        store.configured.store(true, Ordering::SeqCst);
        store
    }

    /// Whether an identity source is configured (then mTLS endpoints are never spoken to in
    /// plaintext).
    pub fn is_configured(&self) -> bool {
        self.configured.load(Ordering::SeqCst)
    }

    /// Make `credentials` current (new connections use them).
    pub fn publish(&self, credentials: Credentials) -> Result<(), IdentityError> {
        let generation = TlsGeneration::new(credentials)?;
        self.configured.store(true, Ordering::SeqCst);
        self.current.store(Some(Arc::new(generation)));
        self.updates.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Forget the identity; `configured` says whether a source remains (fail closed) or not
    /// (plaintext).
    pub fn clear(&self, configured: bool) {
        self.configured.store(configured, Ordering::SeqCst);
        self.current.store(None);
        self.updates.send_modify(|n| *n += 1);
    }

    /// The current generation when its certificate is valid now.
    pub fn current(&self) -> Option<Arc<TlsGeneration>> {
        let generation = self.current.load_full()?;
        generation
            .credentials
            .valid_at(SystemTime::now())
            .then_some(generation)
    }

    /// The current generation even if expired (for renewal decisions and `/config`).
    pub fn latest(&self) -> Option<Arc<TlsGeneration>> {
        self.current.load_full()
    }

    /// Counts publications (tests and helpers wait on it).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.updates.subscribe()
    }
}

/// How the certifier obtains certificates from the controller.
#[derive(Debug, Clone)]
pub struct CertifierOptions {
    /// The identity asked for.
    pub id: SpiffeId,
    /// The proof file (re-read before every call).
    pub token_file: PathBuf,
    /// Smallest retry delay.
    pub min_backoff: Duration,
    /// Largest retry delay.
    pub max_backoff: Duration,
    /// Bound on one Certify call.
    pub call_timeout: Duration,
}

impl CertifierOptions {
    /// Defaults: backoff 500 ms .. 30 s, 10 s per call.
    pub fn new(id: SpiffeId, token_file: impl Into<PathBuf>) -> Self {
        CertifierOptions {
            id,
            token_file: token_file.into(),
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            call_timeout: Duration::from_secs(10),
        }
    }
}

/// Obtain certificates from the controller for as long as `shutdown` stays false: the first one
/// at once, then renewals at 70% of each lifetime; failures retry with backoff while the current
/// certificate keeps serving.
pub async fn run_certifier(
    channel: tonic::transport::Channel,
    options: CertifierOptions,
    store: Arc<IdentityStore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let new_backoff = || {
        backon::ExponentialBuilder::default()
            .with_min_delay(options.min_backoff)
            .with_max_delay(options.max_backoff)
            .with_jitter()
            .without_max_times()
            .build()
    };
    let mut backoff = new_backoff();
    loop {
        let wait = match certify_once(&channel, &options).await {
            Ok(credentials) => {
                let renew_at = credentials.renew_at(SystemTime::now());
                let (id, not_after) = (credentials.id.clone(), credentials.not_after);
                if let Err(e) = store.publish(credentials) {
                    tracing::error!(error = %e, "the new certificate cannot be used; keeping the current one");
                    backoff.next().unwrap_or(options.max_backoff)
                } else {
                    // Only once published: from this line on the proxy serves and makes mTLS
                    // with it (tests and operators wait for this line before sending traffic).
                    tracing::info!(%id, not_after = %humantime::format_rfc3339_seconds(not_after), "certificate obtained");
                    backoff = new_backoff();
                    renew_at
                        .duration_since(SystemTime::now())
                        .unwrap_or_default()
                        .max(MIN_RENEW_DELAY)
                }
            }
            Err(e) => {
                let delay = backoff.next().unwrap_or(options.max_backoff);
                match store.latest() {
                    Some(g) if g.credentials.valid_at(SystemTime::now()) => {
                        tracing::warn!(error = %e, retry_in = ?delay, not_after = %humantime::format_rfc3339_seconds(g.credentials.not_after), "certificate renewal failed; serving with the current certificate")
                    }
                    _ => {
                        tracing::warn!(error = %e, retry_in = ?delay, "no valid certificate; mTLS fails closed until one is obtained")
                    }
                }
                delay
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = crate::shutdown::stopped(&mut shutdown) => return,
        }
    }
}

/// One Certify exchange: new key pair, CSR, proof, call, check the answer.
pub async fn certify_once(
    channel: &tonic::transport::Channel,
    options: &CertifierOptions,
) -> Result<Credentials, IdentityError> {
    let proof = tokio::fs::read(&options.token_file)
        .await
        .map_err(|source| IdentityError::Read {
            path: options.token_file.clone(),
            source,
        })?;
    // A token never ends with whitespace; a trailing newline from `echo` is not part of it.
    let proof = proof.trim_ascii_end().to_vec();
    let asked = options.id.to_string();
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(rcgen::string::Ia5String::try_from(
        asked.as_str(),
    )?)];
    let csr = params.serialize_request(&key_pair)?;
    let request = v1::CertifyRequest {
        identity: asked.clone(),
        csr_der: csr.der().to_vec(),
        proof,
    };
    let mut client = IdentityClient::new(channel.clone());
    let call = client.certify(request);
    let answer = tokio::time::timeout(options.call_timeout, call)
        .await
        .map_err(|_| IdentityError::Timeout(options.call_timeout))??
        .into_inner();
    let chain: Vec<CertificateDer<'static>> = answer
        .chain_der
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let anchors: Vec<CertificateDer<'static>> = answer
        .trust_anchors_der
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let leaf = chain
        .first()
        .ok_or_else(|| IdentityError::InvalidAnswer("empty chain".into()))?;
    let got = spiffe_id_of(leaf)?;
    if got != options.id {
        return Err(IdentityError::WrongIdentity {
            asked,
            got: got.to_string(),
        });
    }
    if public_key_of(leaf)? != rcgen::PublicKeyData::subject_public_key_info(&key_pair) {
        return Err(IdentityError::WrongKey);
    }
    tls_config::verify_chain(&chain, &anchors, UnixTime::now())
        .map_err(|e| IdentityError::InvalidAnswer(format!("the chain does not verify: {e}")))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der()));
    Credentials::new(chain, key, anchors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with_uris(uris: &[&str]) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| rcgen::SanType::URI(rcgen::string::Ia5String::try_from(*u).unwrap()))
            .collect();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn exactly_one_spiffe_uri_is_an_identity() {
        let one = cert_with_uris(&["spiffe://cluster.local/ns/shop/sa/web", "https://x.y/"]);
        assert_eq!(
            spiffe_id_of(&one).unwrap().to_string(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert!(matches!(
            spiffe_id_of(&cert_with_uris(&[])),
            Err(IdentityError::NoSpiffeId)
        ));
        assert!(matches!(
            spiffe_id_of(&cert_with_uris(&[
                "spiffe://cluster.local/ns/shop/sa/web",
                "spiffe://cluster.local/ns/shop/sa/db"
            ])),
            Err(IdentityError::SeveralSpiffeIds(2))
        ));
        assert!(matches!(
            spiffe_id_of(&cert_with_uris(&["spiffe://cluster.local/web"])),
            Err(IdentityError::BadSpiffeId(_))
        ));
    }

    #[test]
    fn credentials_debug_hides_the_key() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from("spiffe://td/ns/a/sa/b").unwrap(),
        )];
        let cert = params.self_signed(&key).unwrap();
        let creds = Credentials::new(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            vec![cert.der().clone()],
        )
        .unwrap();
        let shown = format!("{creds:?}");
        assert!(shown.contains("redacted") && shown.contains("spiffe://td/ns/a/sa/b"));
        let now = SystemTime::now();
        let renew = creds.renew_at(now);
        assert!(renew > now && renew < creds.not_after);
    }
}
