//! The adapter's configuration: where Consul is, how to authenticate, which namespace, and how
//! Consul's data maps onto the endpoint model.

use std::fmt;
use std::time::Duration;

use http::Uri;

/// An ACL token. Its `Debug` and `Display` never show the secret; it is sent only in the
/// `X-Consul-Token` header (never in a URL, so it cannot end up in a logged URL).
#[derive(Clone, PartialEq, Eq)]
pub struct AclToken(String);

impl AclToken {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself, for the one place that sends it.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AclToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AclToken(<redacted>)")
    }
}

impl fmt::Display for AclToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// What an instance whose worst check is `warning` is.
///
/// Consul's own `?passing` filter drops warning instances, while Consul DNS keeps them (unless
/// `only_passing`) and gives them `Weights.Warning`. The adapter follows DNS by default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WarningPolicy {
    /// Ready, with `Weights.Warning` as its weight.
    #[default]
    Ready,
    /// NotReady, like Consul's `?passing` filter.
    NotReady,
}

/// A token bucket for each blocking-query loop (Consul's "Blocking Queries" advice: burst 2, then
/// degrade to polling): the happy path never waits, a server that answers at once cannot make the
/// loop spin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Queries that may go out back to back.
    pub burst: u32,
    /// One more query is allowed every `interval` after the burst is spent.
    pub interval: Duration,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            burst: 2,
            interval: Duration::from_millis(100),
        }
    }
}

/// How to reach Consul and how to read it.
#[derive(Clone, Debug)]
pub struct ConsulConfig {
    /// The HTTP API address: `http://127.0.0.1:8500` (or `127.0.0.1:8500`). Plain HTTP only: talk
    /// to the local agent, as Consul recommends.
    pub address: String,
    pub token: Option<AclToken>,
    /// `Some(ns)`: Consul Enterprise; every query carries `ns=<ServiceKey.namespace>` and the
    /// catalog stream lists `ns`. `None`: Consul OSS; no `ns` parameter is ever sent and services
    /// live in [`ConsulConfig::default_namespace`].
    pub enterprise_namespace: Option<String>,
    /// The ServiceKey namespace of services on Consul OSS (`default`, Consul's own name for it).
    pub default_namespace: String,
    /// `dc` parameter; `None` = the agent's datacenter.
    pub datacenter: Option<String>,
    /// Meta key (or `key=value` tag) naming an instance's service account.
    pub service_account_key: String,
    /// Meta key (or tag) naming an instance's zone; the node's meta is consulted second.
    pub zone_key: String,
    /// Meta key (or tag) giving the protocol (`http`, `http2`, `grpc`, `tcp`).
    pub protocol_key: String,
    pub warning: WarningPolicy,
    /// Blocking `wait`: at most 10 minutes (Consul's cap). Also bounds how long a dead TCP peer
    /// goes unnoticed.
    pub wait: Duration,
    pub rate_limit: RateLimit,
    /// Send `?stale`: any server answers (scales reads; `X-Consul-KnownLeader: false` is then
    /// reported as staleness). Default: false (the leader answers; no leader = an error).
    pub stale: bool,
    /// Timeout of non-blocking requests. Blocking ones get `wait + wait/16 + this`.
    pub request_timeout: Duration,
}

impl ConsulConfig {
    /// Defaults for an agent at `address`.
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            token: None,
            enterprise_namespace: None,
            default_namespace: "default".to_owned(),
            datacenter: None,
            service_account_key: "service-account".to_owned(),
            zone_key: "zone".to_owned(),
            protocol_key: "protocol".to_owned(),
            warning: WarningPolicy::default(),
            wait: Duration::from_secs(60),
            rate_limit: RateLimit::default(),
            stale: false,
            request_timeout: Duration::from_secs(10),
        }
    }

    /// The base URI, or what is wrong with the configuration.
    pub(crate) fn validate(&self) -> Result<Uri, String> {
        let with_scheme = if self.address.contains("://") {
            self.address.clone()
        } else {
            format!("http://{}", self.address)
        };
        let uri: Uri = with_scheme
            .parse()
            .map_err(|e| format!("address {:?} is not a URL: {e}", self.address))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "address {:?}: only http:// is supported (use the local agent's HTTP port)",
                self.address
            ));
        }
        if uri.authority().is_none() {
            return Err(format!("address {:?} has no host", self.address));
        }
        if self.wait.is_zero() || self.wait > Duration::from_secs(600) {
            return Err(format!(
                "wait {:?} must be above 0 and at most 10 minutes (Consul's cap)",
                self.wait
            ));
        }
        if self.rate_limit.burst == 0 {
            return Err("rate_limit.burst must be at least 1".to_owned());
        }
        if self.default_namespace.is_empty() {
            return Err("default_namespace must not be empty".to_owned());
        }
        Ok(uri)
    }

    /// The namespace the catalog stream lists.
    pub(crate) fn catalog_namespace(&self) -> &str {
        self.enterprise_namespace
            .as_deref()
            .unwrap_or(&self.default_namespace)
    }

    /// The `ns` parameter for a ServiceKey namespace: `Ok(Some)` on Enterprise, `Ok(None)` for the
    /// default namespace on OSS, `Err(())` for any other namespace on OSS (no such service).
    pub(crate) fn ns_param(&self, namespace: &str) -> Result<Option<String>, ()> {
        match &self.enterprise_namespace {
            Some(_) => Ok(Some(namespace.to_owned())),
            None if namespace == self.default_namespace => Ok(None),
            None => Err(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_token() {
        let mut config = ConsulConfig::new("127.0.0.1:8500");
        config.token = Some(AclToken::new("b4a1f0c2-secret"));
        let shown = format!("{config:?} {}", config.token.as_ref().unwrap());
        assert!(!shown.contains("b4a1f0c2"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn addresses_are_checked() {
        assert!(ConsulConfig::new("127.0.0.1:8500").validate().is_ok());
        assert!(
            ConsulConfig::new("http://consul.local:8500")
                .validate()
                .is_ok()
        );
        let https = ConsulConfig::new("https://consul:8501")
            .validate()
            .unwrap_err();
        assert!(https.contains("only http://"), "{https}");
        let mut long = ConsulConfig::new("127.0.0.1:8500");
        long.wait = Duration::from_secs(601);
        assert!(long.validate().unwrap_err().contains("10 minutes"));
    }

    #[test]
    fn namespaces_on_oss_and_enterprise() {
        let mut c = ConsulConfig::new("127.0.0.1:8500");
        assert_eq!(c.ns_param("default"), Ok(None));
        assert_eq!(c.ns_param("team-a"), Err(()));
        c.enterprise_namespace = Some("team-a".into());
        assert_eq!(c.ns_param("team-b"), Ok(Some("team-b".into())));
        assert_eq!(c.catalog_namespace(), "team-a");
    }
}
