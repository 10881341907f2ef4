//! The controller's CA and `Identity.Certify`: a proxy sends a CSR and a proof of who it runs
//! as, and gets a short-lived certificate whose only name is its SPIFFE id.
//!
//! - [`ca`]: the checks on trust anchors and issuer, and signing leaves (rcgen).
//! - [`source`]: where the CA comes from (files, a Kubernetes Secret, generated) and reloading it.
//! - [`csr`]: what a CSR may ask for (exactly the SPIFFE id asked, not a CA).
//! - [`proof`]: bootstrap tokens, and Kubernetes TokenReview (`crate::kubernetes`).
//! - this module: [`Certifier`], the gRPC service, with its metrics.
//!
//! A request is answered in this order, the cheap checks first: the identity must be a SPIFFE
//! id of this trust domain (else INVALID_ARGUMENT / PERMISSION_DENIED), the CSR must ask for
//! exactly it (INVALID_ARGUMENT), the proof must prove something (UNAUTHENTICATED; UNAVAILABLE
//! when the API server cannot be asked, so the proxy retries) and what it proves must be that
//! workload (PERMISSION_DENIED). A proxy never gets an identity it cannot prove.

pub mod ca;
pub mod csr;
pub mod proof;
pub mod source;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tonic::Status;
use trellis_proxy_api::spiffe::SpiffeId;
use trellis_proxy_api::v1;

use crate::kubernetes::TokenReviewer;
use proof::{BootstrapTokens, Proven, Prover};
pub use source::{CaHandle, CaSource};

/// Default lifetime of a workload certificate.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// How the CA and the proof checks are set up.
#[derive(Clone)]
pub struct IdentityOptions {
    pub ca: CaSource,
    pub cert_lifetime: Duration,
    /// `--bootstrap-tokens`: YAML of `{workload, sha256}` entries, watched for changes.
    pub bootstrap_tokens: Option<PathBuf>,
    /// Check ServiceAccount tokens with TokenReview (on with `--platform kubernetes`).
    pub token_review: bool,
    /// The audience TokenReview asks for (`--token-audience`).
    pub token_audience: String,
    /// The client for TokenReview and `--ca-secret`; `None` = the kubeconfig's (or in-cluster)
    /// when one is needed. Always `None` in a build without the `kubernetes` feature.
    pub kube: Option<crate::kubernetes::Client>,
    /// How often CA files and the tokens file are looked at without an OS change event (the
    /// fallback poll), and how often a file that failed to load is retried.
    pub file_poll: Duration,
    /// How often the CA Secret is read again.
    pub secret_poll: Duration,
    /// Serve the proxies' gRPC port over TLS with a certificate from this CA
    /// (`--grpc-tls-name`); `None` = plaintext, for loopback or a single host.
    pub grpc_tls: Option<crate::grpc_tls::GrpcTlsOptions>,
}

impl Default for IdentityOptions {
    fn default() -> Self {
        Self {
            ca: CaSource::Generated,
            cert_lifetime: DEFAULT_CERT_LIFETIME,
            bootstrap_tokens: None,
            token_review: false,
            token_audience: "trellis".into(),
            kube: None,
            file_poll: Duration::from_secs(1),
            secret_poll: Duration::from_secs(10),
            grpc_tls: None,
        }
    }
}

impl std::fmt::Debug for IdentityOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityOptions")
            .field("ca", &self.ca)
            .field("cert_lifetime", &self.cert_lifetime)
            .field("bootstrap_tokens", &self.bootstrap_tokens)
            .field("token_review", &self.token_review)
            .field("token_audience", &self.token_audience)
            .field("kube", &self.kube.is_some())
            .field("grpc_tls", &self.grpc_tls)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    reason: &'static str,
}

#[derive(Clone, Default)]
struct Metrics {
    issued: Counter,
    refused: Family<RefusedLabels, Counter>,
    issuer_expiry: Gauge,
}

/// `Identity.Certify`: checks and signs. Cheap to clone.
#[derive(Clone)]
pub struct Certifier {
    inner: Arc<Inner>,
}

struct Inner {
    ca: CaHandle,
    prover: Prover,
    trust_domain: String,
    lifetime: Duration,
    metrics: Metrics,
}

impl std::fmt::Debug for Certifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certifier")
            .field("ca", &self.inner.ca)
            .field("trust_domain", &self.inner.trust_domain)
            .finish_non_exhaustive()
    }
}

/// A refusal: the gRPC status and the metric reason.
struct Refusal {
    reason: &'static str,
    status: Status,
}

fn refuse(reason: &'static str, status: Status) -> Refusal {
    Refusal { reason, status }
}

impl Certifier {
    /// Loads and checks the CA and the proof sources; errors say which file or Secret is wrong.
    pub async fn start(options: &IdentityOptions, trust_domain: &str) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        if let CaSource::Secret { .. } = &options.ca {
            crate::kubernetes::available(&format!("--ca-secret ({})", options.ca))?;
        }
        if options.cert_lifetime < Duration::from_secs(60) {
            anyhow::bail!(
                "--cert-lifetime {:?} is too short (at least 1m)",
                options.cert_lifetime
            );
        }
        let needs_kube = options.token_review || matches!(options.ca, CaSource::Secret { .. });
        let kube = match (&options.kube, needs_kube) {
            (Some(client), _) => Some(client.clone()),
            (None, true) => {
                Some(crate::kubernetes::client("identity (TokenReview / --ca-secret)").await?)
            }
            (None, false) => None,
        };
        let ca = source::start(
            &options.ca,
            kube.as_ref(),
            options.file_poll,
            options.secret_poll,
        )
        .await
        .with_context(|| format!("the CA ({})", options.ca))?;
        let tokens = match &options.bootstrap_tokens {
            Some(path) => Some(BootstrapTokens::start(path.clone(), options.file_poll)?),
            None => None,
        };
        let review = match (options.token_review, kube) {
            (true, Some(client)) => {
                Some(TokenReviewer::new(client, options.token_audience.clone()))
            }
            _ => None,
        };
        let metrics = Metrics::default();
        Ok(Self {
            inner: Arc::new(Inner {
                ca,
                prover: Prover { tokens, review },
                trust_domain: trust_domain.to_owned(),
                lifetime: options.cert_lifetime,
                metrics,
            }),
        })
    }

    /// The CA in force (for status and tests).
    pub fn ca(&self) -> &CaHandle {
        &self.inner.ca
    }

    /// Reload errors of the bootstrap tokens file, if one is configured.
    pub fn token_errors(&self) -> Option<tokio::sync::watch::Receiver<Option<proof::TokensError>>> {
        self.inner
            .prover
            .tokens
            .as_ref()
            .map(BootstrapTokens::errors)
    }

    /// Registers the certificate metrics in `registry`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        let m = &self.inner.metrics;
        registry.register(
            "trellis_controller_certificates_issued",
            "Workload certificates signed",
            m.issued.clone(),
        );
        registry.register(
            "trellis_controller_certificates_refused",
            "Certify requests refused, by reason",
            m.refused.clone(),
        );
        registry.register(
            "trellis_controller_ca_issuer_expiry_seconds",
            "When the issuer certificate in force expires (Unix seconds)",
            m.issuer_expiry.clone(),
        );
        self.update_expiry();
    }

    fn update_expiry(&self) {
        let expiry = self
            .inner
            .ca
            .current()
            .issuer_not_after()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.inner.metrics.issuer_expiry.set(expiry);
    }

    /// Answers one request (the gRPC method without the transport).
    pub async fn certify(
        &self,
        request: &v1::CertifyRequest,
    ) -> Result<v1::CertifyResponse, Status> {
        match self.try_certify(request).await {
            Ok(response) => {
                self.inner.metrics.issued.inc();
                tracing::info!("certified {}", request.identity);
                Ok(response)
            }
            Err(refusal) => {
                self.inner
                    .metrics
                    .refused
                    .get_or_create(&RefusedLabels {
                        reason: refusal.reason,
                    })
                    .inc();
                tracing::info!(
                    "refused a certificate for {:?}: {}",
                    request.identity,
                    refusal.status.message()
                );
                Err(refusal.status)
            }
        }
    }

    async fn try_certify(
        &self,
        request: &v1::CertifyRequest,
    ) -> Result<v1::CertifyResponse, Refusal> {
        let inner = &self.inner;
        let id: SpiffeId = request.identity.parse().map_err(|e| {
            refuse(
                "bad_identity",
                Status::invalid_argument(format!("identity: {e}")),
            )
        })?;
        if id.trust_domain != inner.trust_domain {
            return Err(refuse(
                "trust_domain",
                Status::permission_denied(format!(
                    "identity {id}: this controller issues identities in trust domain {:?} only",
                    inner.trust_domain
                )),
            ));
        }
        let uri = id.to_string();
        let csr = csr::check(&request.csr_der, &uri)
            .map_err(|e| refuse("bad_csr", Status::invalid_argument(e.to_string())))?;
        let proven = inner
            .prover
            .prove(&request.proof)
            .await
            .map_err(|e| refuse("proof_unavailable", Status::unavailable(e.to_string())))?;
        match proven {
            Proven::Nothing(why) => {
                return Err(refuse(
                    "unproven",
                    Status::unauthenticated(format!(
                        "identity {id}: the proof was not accepted: {why}"
                    )),
                ));
            }
            Proven::Workload(workload) if workload != id.workload() => {
                return Err(refuse(
                    "other_identity",
                    Status::permission_denied(format!(
                        "identity {id}: the proof is for workload {workload}, not {}",
                        id.workload()
                    )),
                ));
            }
            Proven::Workload(_) => {}
        }
        let authority = inner.ca.current();
        let issued = authority
            .sign(csr, &uri, inner.lifetime)
            .map_err(|e| refuse("signing", Status::internal(format!("signing failed: {e}"))))?;
        self.update_expiry();
        Ok(v1::CertifyResponse {
            version: issued.version,
            chain_der: issued.chain_der,
            expires_at_unix: issued
                .not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
            trust_anchors_der: issued.anchors_der,
        })
    }
}

#[tonic::async_trait]
impl trellis_controller_grpc::Certify for Certifier {
    async fn certify(&self, request: &v1::CertifyRequest) -> Result<v1::CertifyResponse, Status> {
        Certifier::certify(self, request).await
    }
}
