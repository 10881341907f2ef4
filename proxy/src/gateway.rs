//! The ingress gateway's configuration, compiled ([`crate::config::Gateway`]): the TLS server
//! configuration whose certificate is chosen by the SNI name the client sends, and the host
//! routes into the mesh. The listeners that serve it are in [`crate::server::gateway`].
//!
//! The certificate is chosen with rustls' `ResolvesServerCert`: exact names first, then a
//! one-label wildcard (`*.example.com` covers `a.example.com`, not `a.b.example.com` nor
//! `example.com`, as RFC 6125 6.4.3 has it). A client that names no configured host, or sends no
//! SNI, gets no certificate: rustls ends the handshake with the `unrecognized_name` alert. The
//! gateway speaks TLS 1.2 and 1.3 (public clients), ALPN `h2` and `http/1.1`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config;
use crate::tls::{ALPN_H2, ALPN_HTTP1, provider};

/// Why the gateway could not be set up (at start: the proxy does not start).
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A certificate or key file could not be read or holds no usable PEM.
    #[error("gateway.certificates[{index}]: {path}: {message}")]
    File {
        /// The certificate's index in the config.
        index: usize,
        /// The file.
        path: String,
        /// What was wrong.
        message: String,
    },
    /// The configuration is unusable otherwise.
    #[error("gateway.{field}: {message}")]
    Invalid {
        /// The field.
        field: String,
        /// What was wrong.
        message: String,
    },
}

/// The compiled gateway.
#[derive(Debug)]
pub struct Gateway {
    /// The TLS server configuration (certificate by SNI).
    pub tls: Arc<ServerConfig>,
    /// The certificates the configuration's resolver reads (swapped on reload).
    certificates: Arc<ArcSwap<ByServerName>>,
    /// What they were loaded from.
    sources: Vec<config::GatewayCertificate>,
    /// Destination authority by host (lowercase, no port).
    routes: HashMap<String, Arc<str>>,
    /// The HTTPS listener's port, for redirects (omitted from `Location` when 443).
    pub https_port: u16,
    /// End-user authentication of every request (`gateway.jwt`).
    pub jwt: Option<trellis_jwt::Verifier>,
}

impl Gateway {
    /// Read the certificates and compile the routes of `config`.
    pub fn load(config: &config::Gateway) -> Result<Self, GatewayError> {
        let certificates = Arc::new(ArcSwap::from_pointee(ByServerName::load(
            &config.certificates,
        )?));
        let mut routes = HashMap::new();
        for (i, r) in config.routes.iter().enumerate() {
            let host = r.host.trim().to_ascii_lowercase();
            if host.is_empty() || r.destination.trim().is_empty() {
                return Err(GatewayError::Invalid {
                    field: format!("routes[{i}]"),
                    message: "a route needs a host and a destination".into(),
                });
            }
            if routes
                .insert(host, Arc::from(r.destination.trim()))
                .is_some()
            {
                return Err(GatewayError::Invalid {
                    field: format!("routes[{i}].host"),
                    message: format!("{:?} has two routes", r.host),
                });
            }
        }
        let mut tls = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| GatewayError::Invalid {
                field: "certificates".into(),
                message: e.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(Arc::clone(&certificates))));
        tls.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
        // The verifier starts its key refresh on the runtime: made here, at start, not while
        // compiling a configuration.
        let jwt = match &config.jwt {
            Some(policy) => Some(trellis_jwt::Verifier::new(policy).map_err(|problems| {
                let p = &problems[0];
                GatewayError::Invalid {
                    field: format!("jwt.{}", p.field),
                    message: p.message.clone(),
                }
            })?),
            None => None,
        };
        Ok(Gateway {
            jwt,
            tls: Arc::new(tls),
            certificates,
            sources: config.certificates.clone(),
            routes,
            https_port: config.https.port(),
        })
    }

    /// Reload the certificates whenever their files change, until `stop` resolves; a set that
    /// does not load is logged and the last good one keeps serving.
    pub async fn watch_certificates(
        &self,
        poll: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let files = self
            .sources
            .iter()
            .flat_map(|c| [c.cert.clone(), c.key.clone()]);
        let mut watch =
            trellis_file_watch::FileWatch::new(files, trellis_file_watch::Options::poll(poll));
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = watch.changed() => {}
                () = &mut stop => return,
            }
            match ByServerName::load(&self.sources) {
                Ok(set) => {
                    self.certificates.store(Arc::new(set));
                    tracing::info!("gateway certificates reloaded");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "gateway certificates not reloaded; the last good ones keep serving")
                }
            }
        }
    }

    /// The destination serving `host` (a `Host` value: the port, if any, is ignored).
    pub fn destination(&self, host: &str) -> Option<&Arc<str>> {
        let name = without_port(host);
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            return self.routes.get(&name.to_ascii_lowercase());
        }
        self.routes.get(name)
    }
}

/// Certificates by SNI name: exact, then one-label wildcards.
#[derive(Debug, Default)]
struct ByServerName {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// By the part after `*.`.
    wildcards: HashMap<String, Arc<CertifiedKey>>,
}

impl ByServerName {
    /// Read every certificate of `sources`; the first problem stops it.
    fn load(sources: &[config::GatewayCertificate]) -> Result<Self, GatewayError> {
        let mut by_name = ByServerName::default();
        for (index, c) in sources.iter().enumerate() {
            let key = certified_key(index, &c.cert, &c.key)?;
            if c.hosts.is_empty() {
                return Err(GatewayError::Invalid {
                    field: format!("certificates[{index}].hosts"),
                    message: "a certificate must name at least one host".into(),
                });
            }
            for (h, host) in c.hosts.iter().enumerate() {
                let host = host.trim().to_ascii_lowercase();
                let (map, name) = match host.strip_prefix("*.") {
                    Some(rest) => (&mut by_name.wildcards, rest.to_string()),
                    None => (&mut by_name.exact, host),
                };
                if name.is_empty() || map.insert(name, Arc::clone(&key)).is_some() {
                    return Err(GatewayError::Invalid {
                        field: format!("certificates[{index}].hosts[{h}]"),
                        message: format!("{:?} is empty or named twice", c.hosts[h]),
                    });
                }
            }
        }
        Ok(by_name)
    }
}

/// The TLS resolver: the certificate set in force, read per handshake (one atomic load).
#[derive(Debug)]
struct Resolver(Arc<ArcSwap<ByServerName>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // rustls hands the SNI name lowercased and without a trailing dot.
        let name = hello.server_name()?;
        let set = self.0.load();
        if let Some(key) = set.exact.get(name) {
            return Some(Arc::clone(key));
        }
        let (_, parent) = name.split_once('.')?;
        set.wildcards.get(parent).map(Arc::clone)
    }
}

fn certified_key(index: usize, cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, GatewayError> {
    let file_error = |path: &Path, message: String| GatewayError::File {
        index,
        path: path.display().to_string(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_error(cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(file_error(cert, "no certificate found".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| file_error(key, format!("no private key: {e}")))?;
    let signing = provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| file_error(key, e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| file_error(key, format!("does not match the certificate: {e}")))?;
    Ok(Arc::new(certified))
}

/// A `Host` value without its port (`shop.example.com:8443` -> `shop.example.com`); an IPv6
/// literal keeps its colons (`[::1]:443` -> `[::1]`, `::1` unchanged).
pub fn without_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !name.ends_with(':') => {
            name
        }
        _ => host,
    }
}
