//! SPIFFE workload ids, the one spelling both the controller (CA, inbound policy) and the proxy
//! (certificate verification) use: `spiffe://<trust-domain>/ns/<namespace>/sa/<name>`.
//!
//! Parsing is strict on purpose: an id is compared byte for byte with what a certificate says,
//! so there is exactly one accepted spelling (no trailing slash, no empty segment, no query,
//! lower-case scheme).

use std::fmt;
use std::str::FromStr;

/// A workload identity: a ServiceAccount (or the platform's equivalent) in a trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// Trust domain, e.g. `cluster.local`.
    pub trust_domain: String,
    /// Namespace of the ServiceAccount.
    pub namespace: String,
    /// ServiceAccount name (on Consul / Cloud Map / files: the service name unless an explicit
    /// service-account tag or attribute says otherwise).
    pub name: String,
}

/// Why a string is not a Trellis SPIFFE id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{input:?} is not a SPIFFE id of the form spiffe://<trust-domain>/ns/<namespace>/sa/<name>: {reason}"
)]
pub struct SpiffeIdError {
    input: String,
    reason: &'static str,
}

impl SpiffeId {
    /// The id of `namespace/name` in `trust_domain`.
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        name: impl Into<String>,
    ) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// `namespace/name`, the way proxies name their workload.
    pub fn workload(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.name
        )
    }
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let fail = |reason| SpiffeIdError {
            input: input.to_owned(),
            reason,
        };
        let rest = input
            .strip_prefix("spiffe://")
            .ok_or_else(|| fail("it does not start with spiffe://"))?;
        let mut parts = rest.split('/');
        let (Some(td), Some("ns"), Some(ns), Some("sa"), Some(name), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(fail("the path is not /ns/<namespace>/sa/<name>"));
        };
        if !valid_segment(td) || td.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(fail(
                "the trust domain is empty or not lower-case [a-z0-9.-_]",
            ));
        }
        if !valid_segment(ns) || !valid_segment(name) {
            return Err(fail(
                "the namespace or name is empty or has characters outside [A-Za-z0-9.-_]",
            ));
        }
        Ok(Self::new(td, ns, name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        assert_eq!(id, SpiffeId::new("cluster.local", "shop", "web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(id.workload(), "shop/web");
    }

    #[test]
    fn rejects_other_spellings() {
        for bad in [
            "spiffe://cluster.local/ns/shop/sa/web/",
            "spiffe://cluster.local/ns/shop/sa/",
            "spiffe://cluster.local/ns//sa/web",
            "SPIFFE://cluster.local/ns/shop/sa/web",
            "spiffe://Cluster.local/ns/shop/sa/web",
            "spiffe://cluster.local/sa/web/ns/shop",
            "spiffe://cluster.local/ns/shop/sa/web?x=1",
            "https://cluster.local/ns/shop/sa/web",
            "",
        ] {
            let err = bad.parse::<SpiffeId>().unwrap_err();
            assert!(err.to_string().contains("not a SPIFFE id"), "{bad}: {err}");
        }
    }
}
