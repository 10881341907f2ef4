//! The proxy-facing gRPC port over TLS (`--grpc-tls-name`), so that bootstrap tokens, CSRs and
//! the routing and authorization configuration do not cross a network in clear and cannot be
//! changed on the way.
//!
//! The serving certificate is the controller's own, issued by its mesh CA ([`Authority::sign_server`])
//! for the names given (DNS names or IP addresses: what proxies put in their `--controller
//! https://HOST:PORT` and check the certificate against), with a key made in memory that never
//! leaves the process. Proxies verify it with the mesh's trust anchors (`--controller-ca`).
//!
//! Renewal without a restart: the certificate is re-issued at 2/3 of its lifetime, and at once
//! when the CA changes (a new issuer or anchor set), and swapped into an [`ArcSwap`] that the
//! rustls [`ResolvesServerCert`] reads at every handshake. So new connections get the new
//! certificate, while open ones (a proxy's long-lived watch streams) keep the session they
//! negotiated: TLS checks a certificate at the handshake only. A failed renewal keeps the
//! current certificate and is retried every second (and logged once per new error).
//!
//! tonic's `ServerTlsConfig` takes a fixed identity, so the runtime terminates TLS itself: an
//! accept loop hands each TCP connection to a tokio-rustls acceptor in its own task (a slow or
//! bad handshake holds up nobody, and is limited to [`HANDSHAKE_TIMEOUT`]) and passes finished
//! TLS streams to tonic's `serve_with_incoming`. Crypto is ring, the workspace's one provider.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rcgen::{KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::identity::CaHandle;
use crate::identity::ca::Authority;

/// Default lifetime of the serving certificate.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The shortest lifetime accepted: renewal runs at 2/3 of it, and the tests use a few seconds.
pub const MIN_LIFETIME: Duration = Duration::from_secs(3);

/// How long a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the renewal task looks at the clock and at the CA's version.
const TICK: Duration = Duration::from_secs(1);

/// `--grpc-tls-name` and the lifetime of the serving certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrpcTlsOptions {
    /// DNS names or IP addresses (at least one) the certificate is valid for.
    pub names: Vec<String>,
    pub lifetime: Duration,
}

impl GrpcTlsOptions {
    pub fn new(names: Vec<String>) -> Self {
        Self {
            names,
            lifetime: DEFAULT_LIFETIME,
        }
    }

    /// The names as SANs: an IP address is an IP SAN (proxies dialling `https://10.0.0.5:8090`
    /// check that), anything else a DNS name.
    fn sans(&self) -> anyhow::Result<Vec<SanType>> {
        if self.names.is_empty() {
            anyhow::bail!("--grpc-tls-name: give at least one DNS name or IP address");
        }
        self.names
            .iter()
            .map(|name| {
                let name = name.trim();
                if let Ok(ip) = name.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
                    return Ok(SanType::IpAddress(ip));
                }
                let valid = !name.is_empty()
                    && name.len() <= 253
                    && name.split('.').all(|label| {
                        !label.is_empty()
                            && label.len() <= 63
                            && !label.starts_with('-')
                            && !label.ends_with('-')
                            && label
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '*')
                    });
                if !valid {
                    anyhow::bail!(
                        "--grpc-tls-name {name:?}: not a DNS name or an IP address (what proxies write as HOST in --controller https://HOST:PORT)"
                    );
                }
                Ok(SanType::DnsName(name.try_into().map_err(|e| {
                    anyhow::anyhow!("--grpc-tls-name {name:?}: {e}")
                })?))
            })
            .collect()
    }
}

/// The certificate in force, as people and tests see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServingInfo {
    /// DER of the leaf (its serial changes with every renewal).
    pub leaf_der: Vec<u8>,
    pub not_after: SystemTime,
    /// The CA version it was issued under.
    pub ca_version: String,
}

#[derive(Clone, Default)]
struct Metrics {
    renewals: Counter,
    expiry: Gauge,
    handshake_failures: Counter,
}

/// The serving certificate, renewed in the background while any clone lives.
#[derive(Clone)]
pub struct ServingCert {
    /// What it serves, for logs and metric names: `grpc` or `webhook`.
    purpose: &'static str,
    current: Arc<ArcSwap<CertifiedKey>>,
    info: tokio::sync::watch::Receiver<ServingInfo>,
    errors: tokio::sync::watch::Receiver<Option<String>>,
    metrics: Metrics,
}

impl fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let info = self.info.borrow();
        f.debug_struct("ServingCert")
            .field("not_after", &info.not_after)
            .field("ca_version", &info.ca_version)
            .finish_non_exhaustive()
    }
}

/// One issued certificate: what rustls serves and what is reported.
fn issue(
    authority: &Authority,
    sans: &[SanType],
    lifetime: Duration,
) -> anyhow::Result<(CertifiedKey, ServingInfo)> {
    let key = KeyPair::generate().map_err(|e| anyhow::anyhow!("making a key: {e}"))?;
    let issued = authority
        .sign_server(&key, sans, lifetime)
        .map_err(|e| anyhow::anyhow!("signing with the CA: {e}"))?;
    let signing_key = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            key.serialize_der(),
        )))
        .map_err(|e| anyhow::anyhow!("loading the key into rustls: {e}"))?;
    let info = ServingInfo {
        leaf_der: issued.chain_der[0].clone(),
        not_after: issued.not_after,
        ca_version: issued.version.clone(),
    };
    let chain = issued
        .chain_der
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    Ok((CertifiedKey::new(chain, signing_key), info))
}

/// When to renew a certificate issued at `issued` that expires at `not_after`: 2/3 of the way.
fn renew_at(issued: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after.duration_since(issued).unwrap_or_default();
    issued + life * 2 / 3
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl ServingCert {
    /// Issues the first certificate of the gRPC port (an error here stops the controller from
    /// starting: bad names, a CA that cannot sign) and starts renewing it.
    pub fn start(ca: CaHandle, options: &GrpcTlsOptions) -> anyhow::Result<Self> {
        Self::start_for("grpc", ca, options)
    }

    /// Like [`ServingCert::start`] for another server of the controller (`purpose`, e.g.
    /// `webhook`: its logs and metric names say so).
    pub fn start_for(
        purpose: &'static str,
        ca: CaHandle,
        options: &GrpcTlsOptions,
    ) -> anyhow::Result<Self> {
        if options.lifetime < MIN_LIFETIME {
            anyhow::bail!(
                "--grpc-tls-lifetime {:?} is too short (at least {MIN_LIFETIME:?})",
                options.lifetime
            );
        }
        let sans = options.sans()?;
        let issued_at = SystemTime::now();
        let (key, info) = issue(&ca.current(), &sans, options.lifetime)
            .map_err(|e| e.context(format!("issuing the {purpose} serving certificate")))?;
        tracing::info!(
            names = ?options.names,
            "{purpose} serving certificate issued by the mesh CA (version {}), valid until {}",
            info.ca_version,
            humantime::format_rfc3339_seconds(info.not_after)
        );
        let metrics = Metrics::default();
        metrics.expiry.set(unix(info.not_after));
        let current = Arc::new(ArcSwap::from_pointee(key));
        let (info_tx, info_rx) = tokio::sync::watch::channel(info);
        let (errors_tx, errors) = tokio::sync::watch::channel(None);
        let renewer = Renewer {
            purpose,
            current: Arc::downgrade(&current),
            info: info_tx,
            errors: errors_tx,
            ca,
            sans,
            lifetime: options.lifetime,
            issued_at,
            metrics: metrics.clone(),
        };
        tokio::spawn(renewer.run());
        Ok(Self {
            purpose,
            current,
            info: info_rx,
            errors,
            metrics,
        })
    }

    /// Why the last renewal failed (`None` once one succeeds); the current certificate keeps
    /// serving meanwhile. `trellis controller` prints these on stderr.
    pub fn errors(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.errors.clone()
    }

    /// The certificate in force; changes with every renewal.
    pub fn info(&self) -> tokio::sync::watch::Receiver<ServingInfo> {
        self.info.clone()
    }

    /// Registers the serving certificate's metrics in `registry`
    /// (`trellis_controller_<purpose>_tls_*`).
    pub fn register_metrics(&self, registry: &mut Registry) {
        let purpose = self.purpose;
        registry.register(
            format!("trellis_controller_{purpose}_tls_renewals"),
            format!("{purpose} serving certificates issued after the first"),
            self.metrics.renewals.clone(),
        );
        registry.register(
            format!("trellis_controller_{purpose}_tls_expiry_seconds"),
            format!("When the {purpose} serving certificate in force expires (Unix seconds)"),
            self.metrics.expiry.clone(),
        );
        registry.register(
            format!("trellis_controller_{purpose}_tls_handshake_failures"),
            format!(
                "{purpose} TLS handshakes that failed or timed out (e.g. a client that does not trust this CA)"
            ),
            self.metrics.handshake_failures.clone(),
        );
    }

    /// The rustls configuration that serves the current certificate: TLS 1.3, HTTP/2 (gRPC).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server_config_with_alpn(vec![b"h2".to_vec()])
    }

    /// Like [`ServingCert::server_config`] offering the ALPN protocols `alpn` (the webhooks:
    /// `h2` and `http/1.1`, as the API server may use either).
    pub fn server_config_with_alpn(&self, alpn: Vec<Vec<u8>>) -> Arc<rustls::ServerConfig> {
        self.server_config_with(alpn, None)
    }

    /// Like [`ServingCert::server_config_with_alpn`], asking clients for certificates checked
    /// by `clients` (the webhook port when it serves the aggregated TrafficMetrics API).
    pub fn server_config_with(
        &self,
        alpn: Vec<Vec<u8>>,
        clients: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    ) -> Arc<rustls::ServerConfig> {
        let resolver = Arc::new(Resolver(Arc::clone(&self.current)));
        let builder = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3");
        let builder = match clients {
            Some(verifier) => builder.with_client_cert_verifier(verifier),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(resolver);
        config.alpn_protocols = alpn;
        Arc::new(config)
    }
}

/// Reads the certificate in force at every handshake.
#[derive(Debug)]
struct Resolver(Arc<ArcSwap<CertifiedKey>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

struct Renewer {
    purpose: &'static str,
    current: std::sync::Weak<ArcSwap<CertifiedKey>>,
    info: tokio::sync::watch::Sender<ServingInfo>,
    errors: tokio::sync::watch::Sender<Option<String>>,
    ca: CaHandle,
    sans: Vec<SanType>,
    lifetime: Duration,
    issued_at: SystemTime,
    metrics: Metrics,
}

impl Renewer {
    async fn run(mut self) {
        loop {
            tokio::time::sleep(TICK).await;
            let Some(current) = self.current.upgrade() else {
                return;
            };
            let authority = self.ca.current();
            let (due, ca_changed) = {
                let info = self.info.borrow();
                (
                    SystemTime::now() >= renew_at(self.issued_at, info.not_after),
                    info.ca_version != authority.version(),
                )
            };
            if !due && !ca_changed {
                continue;
            }
            let issued_at = SystemTime::now();
            match issue(&authority, &self.sans, self.lifetime) {
                Ok((key, info)) => {
                    tracing::info!(
                        "{} serving certificate renewed ({}; CA version {}), valid until {}",
                        self.purpose,
                        if ca_changed {
                            "the CA changed"
                        } else {
                            "2/3 of its lifetime"
                        },
                        info.ca_version,
                        humantime::format_rfc3339_seconds(info.not_after)
                    );
                    current.store(Arc::new(key));
                    self.metrics.expiry.set(unix(info.not_after));
                    self.metrics.renewals.inc();
                    self.info.send_replace(info);
                    self.issued_at = issued_at;
                    self.errors.send_if_modified(|e| e.take().is_some());
                }
                Err(e) => {
                    let e = format!(
                        "renewing failed: {e:#}; the current certificate keeps serving, retrying every {TICK:?}"
                    );
                    self.errors.send_if_modified(|old| {
                        if old.as_ref() == Some(&e) {
                            return false;
                        }
                        tracing::error!("{} serving certificate: {e}", self.purpose);
                        *old = Some(e);
                        true
                    });
                }
            }
        }
    }
}

impl ServingCert {
    /// The TLS connections of `listener`, for tonic's `serve_with_incoming`: each handshake runs
    /// in its own task (bounded by [`HANDSHAKE_TIMEOUT`]); failed ones are counted, logged with
    /// the peer and the reason (a proxy that does not trust this certificate shows up here) and
    /// dropped.
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> impl tokio_stream::Stream<Item = std::io::Result<TlsStream<TcpStream>>> + Send + 'static
    {
        let acceptor = TlsAcceptor::from(self.server_config());
        let failures = self.metrics.handshake_failures.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: pause rather than spin.
                        tracing::warn!("gRPC accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    // tonic stopped serving.
                    return;
                }
                let _ = tcp.set_nodelay(true);
                let (acceptor, sender, failures) = (acceptor.clone(), tx.clone(), failures.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = sender.send(Ok(tls)).await;
                        }
                        Ok(Err(e)) => {
                            failures.inc();
                            tracing::info!("gRPC TLS handshake from {peer} failed: {e}");
                        }
                        Err(_) => {
                            failures.inc();
                            tracing::info!(
                                "gRPC TLS handshake from {peer} did not finish within {HANDSHAKE_TIMEOUT:?}"
                            );
                        }
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_ip_or_dns_sans_and_bad_ones_say_what_is_expected() {
        let sans = GrpcTlsOptions::new(vec![
            "127.0.0.1".into(),
            "::1".into(),
            "[fd00::1]".into(),
            "trellis-controller.trellis-system.svc".into(),
        ])
        .sans()
        .unwrap();
        assert_eq!(sans[0], SanType::IpAddress("127.0.0.1".parse().unwrap()));
        assert_eq!(sans[1], SanType::IpAddress("::1".parse().unwrap()));
        assert_eq!(sans[2], SanType::IpAddress("fd00::1".parse().unwrap()));
        assert!(
            matches!(&sans[3], SanType::DnsName(n) if n.as_str() == "trellis-controller.trellis-system.svc")
        );
        for bad in ["", "http://x", "a..b", "-x.y", "x:8090"] {
            let e = GrpcTlsOptions::new(vec![bad.into()]).sans().unwrap_err();
            assert!(e.to_string().contains("--grpc-tls-name"), "{bad}: {e}");
        }
        assert!(GrpcTlsOptions::new(vec![]).sans().is_err());
    }

    #[test]
    fn renewal_is_due_at_two_thirds_of_the_lifetime() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(
            renew_at(t0, t0 + Duration::from_secs(3 * 3600)),
            t0 + Duration::from_secs(2 * 3600)
        );
    }
}
