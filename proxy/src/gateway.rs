//! The ingress gateway's configuration, compiled ([`crate::config::Gateway`]): the TLS server
//! configuration whose certificate is chosen by the SNI name the client sends, and the host and
//! path routes into the mesh. The listeners that serve it are in [`crate::server::gateway`].
//!
//! Routes are by exact host, then by path prefix within the host, whole segments only (`/api`
//! matches `/api` and `/api/v1`, not `/apix`), the longest prefix winning. A host with no route
//! is answered `404 unknown-host`, a path none of its host's prefixes match `404 no-route`.
//!
//! The gateway can also be configured by a Gateway resource document ([`trellis_gateway`],
//! `trellis-proxy --gateway FILE`): [`compile`] turns it into the same configuration, and
//! [`Gateway::watch_document`] reloads the routes and the certificate list when the file changes
//! (a bad version is logged with its line and field and not applied). Listener addresses and the
//! JWT policy are read at start: a change to them is logged as needing a restart.
//!
//! The certificate is chosen with rustls' `ResolvesServerCert`: exact names first, then a
//! one-label wildcard (`*.example.com` covers `a.example.com`, not `a.b.example.com` nor
//! `example.com`, as RFC 6125 6.4.3 has it). A client that names no configured host, or sends no
//! SNI, gets no certificate: rustls ends the handshake with the `unrecognized_name` alert. The
//! gateway speaks TLS 1.2 and 1.3 (public clients), ALPN `h2` and `http/1.1`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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

/// The `source` label of the gateway's reloads in `trellis_config_updates_total`.
const GATEWAY_SOURCE: &str = "gateway";

/// The compiled gateway.
#[derive(Debug)]
pub struct Gateway {
    /// The TLS server configuration (certificate by SNI).
    pub tls: Arc<ServerConfig>,
    /// The certificates the configuration's resolver reads (swapped on reload).
    certificates: Arc<ArcSwap<ByServerName>>,
    /// What they were loaded from (swapped with them when the Gateway document changes).
    sources: ArcSwap<Vec<config::GatewayCertificate>>,
    /// The routes (swapped when the Gateway document changes).
    routes: ArcSwap<GatewayRoutes>,
    /// What was read at start and needs a restart to change: the listeners and the JWT policy.
    fixed: (
        SocketAddr,
        Option<SocketAddr>,
        Option<trellis_jwt::JwtPolicy>,
    ),
    /// The HTTPS listener's port, for redirects (omitted from `Location` when 443).
    pub https_port: u16,
    /// End-user authentication of every request (`gateway.jwt`).
    pub jwt: Option<trellis_jwt::Verifier>,
}

/// Where the gateway sends a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routed {
    /// To this destination authority.
    To(Arc<str>),
    /// No route for the host (`404 unknown-host`).
    UnknownHost,
    /// The host has routes, none for the path (`404 no-route`).
    NoRoute,
}

/// The gateway's routes: by host (lowercase, no port), the path prefixes longest first.
#[derive(Debug, Default)]
pub struct GatewayRoutes {
    by_host: HashMap<String, Vec<(String, Arc<str>)>>,
}

impl GatewayRoutes {
    /// Compile `routes`; the first problem stops it.
    pub fn compile(routes: &[config::GatewayRoute]) -> Result<Self, GatewayError> {
        let mut by_host: HashMap<String, Vec<(String, Arc<str>)>> = HashMap::new();
        for (i, r) in routes.iter().enumerate() {
            let host = r.host.trim().to_ascii_lowercase();
            if host.is_empty() || r.destination.trim().is_empty() {
                return Err(GatewayError::Invalid {
                    field: format!("routes[{i}]"),
                    message: "a route needs a host and a destination".into(),
                });
            }
            let written = r.path_prefix.as_deref().unwrap_or("/");
            if !written.starts_with('/') {
                return Err(GatewayError::Invalid {
                    field: format!("routes[{i}].path_prefix"),
                    message: format!("{written:?} does not start with /"),
                });
            }
            let prefix = trellis_gateway::normalize_prefix(written);
            let prefixes = by_host.entry(host).or_default();
            if prefixes.iter().any(|(p, _)| *p == prefix) {
                return Err(GatewayError::Invalid {
                    field: format!("routes[{i}]"),
                    message: format!("{:?} has two routes for path prefix {prefix:?}", r.host),
                });
            }
            prefixes.push((prefix, Arc::from(r.destination.trim())));
        }
        for prefixes in by_host.values_mut() {
            // Longest first: the first match is the longest.
            prefixes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        }
        Ok(GatewayRoutes { by_host })
    }

    /// Where a request for `host` (a `Host` value: the port, if any, is ignored) and `path`
    /// goes.
    pub fn route(&self, host: &str, path: &str) -> Routed {
        let name = without_port(host);
        let prefixes = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            self.by_host.get(&name.to_ascii_lowercase())
        } else {
            self.by_host.get(name)
        };
        let Some(prefixes) = prefixes else {
            return Routed::UnknownHost;
        };
        prefixes
            .iter()
            .find(|(prefix, _)| prefix_matches(prefix, path))
            .map_or(Routed::NoRoute, |(_, to)| Routed::To(Arc::clone(to)))
    }
}

/// Whether `path` is under `prefix` by whole segments (`prefix` has no trailing slash but `/`).
fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

impl Gateway {
    /// Read the certificates and compile the routes of `config`.
    pub fn load(config: &config::Gateway) -> Result<Self, GatewayError> {
        let certificates = Arc::new(ArcSwap::from_pointee(ByServerName::load(
            &config.certificates,
        )?));
        let routes = GatewayRoutes::compile(&config.routes)?;
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
            sources: ArcSwap::from_pointee(config.certificates.clone()),
            routes: ArcSwap::from_pointee(routes),
            fixed: (config.https, config.http_redirect, config.jwt.clone()),
            https_port: config.https.port(),
        })
    }

    /// Apply a new version of the configuration: its certificates and routes, both or neither
    /// (a problem leaves the running ones in force). Listeners and the JWT policy are kept as
    /// they were at start; a change to them is logged as needing a restart.
    pub fn reload(&self, config: &config::Gateway) -> Result<(), GatewayError> {
        let routes = GatewayRoutes::compile(&config.routes)?;
        let certificates = ByServerName::load(&config.certificates)?;
        if (config.https, config.http_redirect) != (self.fixed.0, self.fixed.1) {
            tracing::warn!(
                "the gateway's listener addresses changed; they take effect when the proxy restarts"
            );
        }
        if config.jwt != self.fixed.2 {
            tracing::warn!(
                "the gateway's jwt policy changed; it takes effect when the proxy restarts"
            );
        }
        self.certificates.store(Arc::new(certificates));
        self.sources.store(Arc::new(config.certificates.clone()));
        self.routes.store(Arc::new(routes));
        Ok(())
    }

    /// Where a request for `host` and `path` goes.
    pub fn route(&self, host: &str, path: &str) -> Routed {
        self.routes.load().route(host, path)
    }

    /// The files the certificates are read from.
    fn certificate_files(&self) -> Vec<PathBuf> {
        self.sources
            .load()
            .iter()
            .flat_map(|c| [c.cert.clone(), c.key.clone()])
            .collect()
    }

    /// Watch the Gateway document at `path` and the certificate files it names until `stop`
    /// resolves: a change to any of them re-reads the document and applies it ([`reload`]:
    /// routes and certificates). A version that does not read, compile or load is logged with
    /// its file, line and field, and the last good one keeps serving. Each outcome is counted
    /// in `trellis_config_updates_total{source="gateway"}`.
    ///
    /// [`reload`]: Gateway::reload
    pub async fn watch_document(
        &self,
        path: PathBuf,
        poll: Duration,
        metrics: &crate::metrics::Metrics,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let options = trellis_file_watch::Options::poll(poll);
        let files = |me: &Self| {
            let mut files = vec![path.clone()];
            files.extend(me.certificate_files());
            files
        };
        let mut watch = trellis_file_watch::FileWatch::new(files(self), options);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = watch.changed() => {}
                () = &mut stop => return,
            }
            let applied = read_document(&path).and_then(|config| {
                self.reload(&config)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
            });
            metrics.update(GATEWAY_SOURCE, applied.is_ok());
            match applied {
                Ok(()) => tracing::info!(path = %path.display(), "gateway reloaded"),
                Err(e) => tracing::error!(
                    error = format!("{e:#}"),
                    "gateway reload rejected; the last good routes and certificates keep serving"
                ),
            }
            // The new version may name other certificate files: watch those from now on.
            let now = files(self);
            if now != watch.paths() {
                watch = trellis_file_watch::FileWatch::new(now, options);
            }
        }
    }

    /// Reload the certificates whenever their files change, until `stop` resolves; a set that
    /// does not load is logged and the last good one keeps serving (both counted as for
    /// [`Gateway::watch_document`]).
    pub async fn watch_certificates(
        &self,
        poll: Duration,
        metrics: &crate::metrics::Metrics,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let mut watch = trellis_file_watch::FileWatch::new(
            self.certificate_files(),
            trellis_file_watch::Options::poll(poll),
        );
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = watch.changed() => {}
                () = &mut stop => return,
            }
            let loaded = ByServerName::load(&self.sources.load());
            metrics.update(GATEWAY_SOURCE, loaded.is_ok());
            match loaded {
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
}

/// Read the Gateway document at `path` and compile it ([`compile`]); errors name the file,
/// line, Gateway and field.
pub fn read_document(path: &Path) -> anyhow::Result<config::Gateway> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
    let document =
        trellis_gateway::read(&text).map_err(|e| anyhow::anyhow!("{}:{e}", path.display()))?;
    Ok(compile(&document, path.parent()))
}

/// The proxy's gateway configuration of a Gateway document: listeners, certificate files
/// (relative ones under `dir`, the document's folder), routes to the authority
/// `service.namespace:port` of each route's service, the JWT policy. `document` is one that
/// [`trellis_gateway::read`] accepted.
pub fn compile(document: &trellis_gateway::GatewayDocument, dir: Option<&Path>) -> config::Gateway {
    let spec = &document.spec;
    let file = |f: String| {
        let f = PathBuf::from(f);
        match dir {
            Some(dir) if f.is_relative() => dir.join(f),
            _ => f,
        }
    };
    config::Gateway {
        https: spec.https.socket_addr(),
        http_redirect: spec.http_redirect.as_ref().map(|l| l.socket_addr()),
        certificates: spec
            .certificates
            .iter()
            .filter_map(|c| {
                // `read` refused certificates without files.
                let (cert, key) = c.files()?;
                Some(config::GatewayCertificate {
                    hosts: c.hosts.clone(),
                    cert: file(cert),
                    key: file(key),
                })
            })
            .collect(),
        routes: spec
            .routes
            .iter()
            .map(|r| config::GatewayRoute {
                host: r.host.clone(),
                path_prefix: r.path_prefix.clone(),
                destination: r.service.authority(document.namespace()),
            })
            .collect(),
        jwt: spec.jwt.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: &str, prefix: Option<&str>, destination: &str) -> config::GatewayRoute {
        config::GatewayRoute {
            host: host.into(),
            path_prefix: prefix.map(Into::into),
            destination: destination.into(),
        }
    }

    #[test]
    fn the_longest_whole_segment_prefix_wins() {
        let routes = GatewayRoutes::compile(&[
            route("Shop.example.com", Some("/api"), "api.shop"),
            route("shop.example.com", None, "web.shop"),
            route("shop.example.com", Some("/api/admin/"), "admin.shop"),
            route("only.example.com", Some("/x"), "x.shop"),
        ])
        .unwrap();
        let to = |d: &str| Routed::To(Arc::from(d));
        for (host, path, expected) in [
            ("shop.example.com", "/", to("web.shop")),
            ("SHOP.example.com:8443", "/api", to("api.shop")),
            ("shop.example.com", "/api/", to("api.shop")),
            ("shop.example.com", "/apis", to("web.shop")),
            ("shop.example.com", "/api/admin", to("admin.shop")),
            ("shop.example.com", "/api/admin/users", to("admin.shop")),
            ("shop.example.com", "/api/administrators", to("api.shop")),
            ("only.example.com", "/x/y", to("x.shop")),
            ("only.example.com", "/", Routed::NoRoute),
            ("other.example.com", "/", Routed::UnknownHost),
        ] {
            assert_eq!(routes.route(host, path), expected, "{host}{path}");
        }
    }

    #[test]
    fn a_prefix_routed_twice_or_without_a_slash_is_refused() {
        let twice = GatewayRoutes::compile(&[
            route("a.example.com", Some("/api/"), "x.shop"),
            route("a.example.com", Some("/api"), "y.shop"),
        ])
        .unwrap_err();
        assert!(
            twice.to_string().starts_with("gateway.routes[1]:"),
            "{twice}"
        );
        let relative =
            GatewayRoutes::compile(&[route("a.example.com", Some("api"), "x.shop")]).unwrap_err();
        assert!(
            relative
                .to_string()
                .starts_with("gateway.routes[0].path_prefix:"),
            "{relative}"
        );
    }

    /// One document compiles into the proxy's configuration: listeners, files (relative ones
    /// under the document's folder, Secrets at their mount), routes to `name.namespace:port`.
    #[test]
    fn a_gateway_document_compiles_into_the_gateway_configuration() {
        let document = trellis_gateway::read(
            "apiVersion: policy.trellis.io/v1alpha1
kind: Gateway
metadata: {name: public, namespace: shop}
spec:
  https: {port: 8443}
  httpRedirect: {port: 8080, address: \"::\"}
  certificates:
    - hosts: [shop.example.com]
      secretName: shop-tls
    - hosts: [\"*.api.example.com\"]
      certFile: tls/api.crt
      keyFile: /abs/api.key
  routes:
    - host: shop.example.com
      service: {name: web, port: 80}
    - host: eu.api.example.com
      pathPrefix: /v1
      service: {name: api, namespace: backend, port: 8080}
",
        )
        .unwrap();
        let compiled = compile(&document, Some(Path::new("/etc/gw")));
        let expected: config::Gateway = serde_yaml_ng::from_str(
            "https: 0.0.0.0:8443
http_redirect: \"[::]:8080\"
certificates:
  - hosts: [shop.example.com]
    cert: /etc/trellis/gateway/tls/shop-tls/tls.crt
    key: /etc/trellis/gateway/tls/shop-tls/tls.key
  - hosts: [\"*.api.example.com\"]
    cert: /etc/gw/tls/api.crt
    key: /abs/api.key
routes:
  - host: shop.example.com
    destination: web.shop:80
  - host: eu.api.example.com
    path_prefix: /v1
    destination: api.backend:8080
",
        )
        .unwrap();
        assert_eq!(compiled, expected);
        // What it compiles to is a configuration the proxy accepts.
        let routes = GatewayRoutes::compile(&compiled.routes).unwrap();
        assert_eq!(
            routes.route("eu.api.example.com", "/v1/x"),
            Routed::To(Arc::from("api.backend:8080"))
        );
    }
}
