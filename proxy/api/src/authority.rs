//! Authority normalization shared by the controller and the proxy.
//!
//! Applications address a destination in many spellings; the mesh must treat them as one:
//!
//! | written                                   | normalized name | port   |
//! |-------------------------------------------|-----------------|--------|
//! | `web.shop`                                | `web.shop`      | -      |
//! | `Web.Shop:8080`                           | `web.shop`      | 8080   |
//! | `web.shop.svc`                            | `web.shop`      | -      |
//! | `web.shop.svc.cluster.local.:9091`        | `web.shop`      | 9091   |
//! | `web.shop.svc.example.org` (any cluster domain) | `web.shop` | -      |
//! | `web.service.consul`                      | `web.<consul namespace>` (`default`) | - |
//! | `web.service.dc1.consul`, `web.service.shop.ns.consul`, `web.service.shop.ns.dc1.dc.consul` | `web.default` / `web.shop` | - |
//! | `web` (one label)                         | `web.<namespace>` if one is configured, else `web` | - |
//! | `10.0.3.7:8080`, `[fd00::1]:80`           | the IP address (an original destination) | kept |
//!
//! Rules: surrounding whitespace is trimmed, names are lower-cased (DNS is case-insensitive), one
//! trailing dot is dropped, the port is split off. A Kubernetes name is `name.namespace` followed
//! by `svc` and any cluster domain. Consul DNS names follow
//! `[tag.]name.service[.ns-name.ns][.partition.ap][.dc.dc | .dc].consul`; the tag, partition and
//! datacenter do not change which service is meant.
//!
//! The lookup key is [`Authority::key`]: the name for DNS names (the port selects a port *of* the
//! destination, not another destination), `ip:port` for IP addresses (a different port on one IP
//! is a different service).

use std::fmt;
use std::net::IpAddr;

/// A normalized authority.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Authority {
    /// Normalized host: `name.namespace`, a single label, another DNS name, or an IP address.
    pub name: String,
    /// The port, when one was written.
    pub port: Option<u16>,
    /// Whether `name` is an IP address (then the port is part of the identity).
    pub is_ip: bool,
}

impl Authority {
    /// The key a destination is stored and looked up under (see the module docs).
    pub fn key(&self) -> String {
        match (self.is_ip, self.port) {
            (true, Some(port)) if self.name.contains(':') => format!("[{}]:{port}", self.name),
            (true, Some(port)) => format!("{}:{port}", self.name),
            _ => self.name.clone(),
        }
    }
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) if self.is_ip && self.name.contains(':') => {
                write!(f, "[{}]:{port}", self.name)
            }
            Some(port) => write!(f, "{}:{port}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// Why an authority could not be normalized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    /// Nothing was written.
    #[error("empty authority")]
    Empty,
    /// The part after the last `:` is not a port number.
    #[error("invalid port {port:?} in authority {authority:?}")]
    InvalidPort {
        /// The authority as written.
        authority: String,
        /// The offending port text.
        port: String,
    },
    /// The host has characters no DNS name or IP address has.
    #[error("invalid host {host:?} in authority {authority:?}: {reason}")]
    InvalidHost {
        /// The authority as written.
        authority: String,
        /// The host part.
        host: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Options for [`normalize_with`].
#[derive(Debug, Clone)]
pub struct Options<'a> {
    /// Namespace for single-label names (`web` -> `web.<namespace>`); `None` leaves them alone.
    pub namespace: Option<&'a str>,
    /// Namespace for Consul names without an `.ns` part.
    pub consul_namespace: &'a str,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Options {
            namespace: None,
            consul_namespace: "default",
        }
    }
}

/// Normalize with default [`Options`] (no namespace for single labels, Consul namespace `default`).
pub fn normalize(authority: &str) -> Result<Authority, AuthorityError> {
    normalize_with(authority, &Options::default())
}

/// Normalize `authority` (a Host header, `:authority`, a configured name or an `ip:port`).
pub fn normalize_with(authority: &str, options: &Options<'_>) -> Result<Authority, AuthorityError> {
    let written = authority.trim();
    if written.is_empty() {
        return Err(AuthorityError::Empty);
    }
    let (host, port) = split_port(written)?;
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return Err(AuthorityError::Empty);
    }
    if let Ok(ip) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        return Ok(Authority {
            name: ip.to_string(),
            port,
            is_ip: true,
        });
    }
    validate_dns(written, host)?;
    let lower = host.to_ascii_lowercase();
    let labels: Vec<&str> = lower.split('.').collect();
    let name = canonical_name(&labels, options).unwrap_or_else(|| lower.clone());
    Ok(Authority {
        name,
        port,
        is_ip: false,
    })
}

fn split_port(written: &str) -> Result<(&str, Option<u16>), AuthorityError> {
    let bad_port = |port: &str| AuthorityError::InvalidPort {
        authority: written.to_string(),
        port: port.to_string(),
    };
    if let Some(rest) = written.strip_prefix('[') {
        // [v6]:port or [v6]
        let Some(end) = rest.find(']') else {
            return Err(AuthorityError::InvalidHost {
                authority: written.to_string(),
                host: written.to_string(),
                reason: "unclosed '['",
            });
        };
        let host = &written[..end + 2];
        return match &rest[end + 1..] {
            "" => Ok((host, None)),
            tail => match tail.strip_prefix(':') {
                Some(port) => port
                    .parse()
                    .map(|p| (host, Some(p)))
                    .map_err(|_| bad_port(port)),
                None => Err(bad_port(tail)),
            },
        };
    }
    if written.matches(':').count() > 1 {
        // A bare IPv6 address without brackets has no port.
        return Ok((written, None));
    }
    match written.rsplit_once(':') {
        Some((host, port)) => port
            .parse()
            .map(|p| (host, Some(p)))
            .map_err(|_| bad_port(port)),
        None => Ok((written, None)),
    }
}

fn validate_dns(written: &str, host: &str) -> Result<(), AuthorityError> {
    let invalid = |reason| AuthorityError::InvalidHost {
        authority: written.to_string(),
        host: host.to_string(),
        reason,
    };
    if host.len() > 253 {
        return Err(invalid("longer than 253 characters"));
    }
    for label in host.split('.') {
        if label.is_empty() {
            return Err(invalid("empty label"));
        }
        if label.len() > 63 {
            return Err(invalid("label longer than 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(invalid(
                "only letters, digits, '-' and '_' are allowed in a label",
            ));
        }
    }
    Ok(())
}

/// `name.namespace` for Kubernetes and Consul spellings, `None` for other names.
fn canonical_name(labels: &[&str], options: &Options<'_>) -> Option<String> {
    match labels {
        [name] => options.namespace.map(|ns| format!("{name}.{ns}")),
        [name, namespace] => Some(format!("{name}.{namespace}")),
        [.., "consul"] => consul_name(&labels[..labels.len() - 1], options),
        [name, namespace, "svc", ..] => Some(format!("{name}.{namespace}")),
        _ => None,
    }
}

fn consul_name(labels: &[&str], options: &Options<'_>) -> Option<String> {
    // `[tag.]name.service[...]`: the label before `service` is the name.
    let service_at = labels.iter().position(|l| *l == "service")?;
    if service_at == 0 || service_at > 2 {
        return None;
    }
    let name = labels[service_at - 1];
    let mut namespace = options.consul_namespace;
    let rest = &labels[service_at + 1..];
    let mut i = 0;
    while i < rest.len() {
        match rest.get(i + 1) {
            Some(&"ns") => {
                namespace = rest[i];
                i += 2;
            }
            Some(&"ap") | Some(&"dc") | Some(&"peer") => i += 2,
            _ => i += 1, // a bare datacenter
        }
    }
    Some(format!("{name}.{namespace}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(a: &str) -> String {
        normalize(a).unwrap_or_else(|e| panic!("{a}: {e}")).key()
    }

    #[test]
    fn kubernetes_spellings_name_one_destination() {
        for a in [
            "web.shop",
            "web.shop:80",
            "Web.Shop",
            "web.shop.",
            "web.shop.svc",
            "web.shop.svc.cluster.local",
            "web.shop.svc.cluster.local.",
            "web.shop.svc.cluster.local.:9091",
            "web.shop.svc.example.org:8080",
            " web.shop ",
        ] {
            assert_eq!(key(a), "web.shop", "{a}");
        }
        assert_eq!(
            normalize("web.shop.svc.cluster.local.:9091").unwrap().port,
            Some(9091)
        );
    }

    #[test]
    fn consul_spellings() {
        assert_eq!(key("web.service.consul"), "web.default");
        assert_eq!(key("web.service.consul."), "web.default");
        assert_eq!(key("web.service.dc1.consul:8500"), "web.default");
        assert_eq!(key("v2.web.service.consul"), "web.default");
        assert_eq!(key("web.service.shop.ns.consul"), "web.shop");
        assert_eq!(key("web.service.shop.ns.part.ap.dc1.dc.consul"), "web.shop");
        let opts = Options {
            namespace: None,
            consul_namespace: "mesh",
        };
        assert_eq!(
            normalize_with("web.service.consul", &opts).unwrap().key(),
            "web.mesh"
        );
    }

    #[test]
    fn single_labels_take_the_configured_namespace() {
        assert_eq!(key("web"), "web");
        let opts = Options {
            namespace: Some("shop"),
            ..Options::default()
        };
        assert_eq!(normalize_with("web:80", &opts).unwrap().key(), "web.shop");
    }

    #[test]
    fn ip_addresses_keep_their_port_in_the_key() {
        assert_eq!(key("10.0.3.7:8080"), "10.0.3.7:8080");
        assert_eq!(key("10.0.3.7"), "10.0.3.7");
        assert_eq!(key("[FD00::1]:80"), "[fd00::1]:80");
        assert_eq!(key("fd00::1"), "fd00::1");
        assert_eq!(
            normalize("[fd00::1]:80").unwrap().to_string(),
            "[fd00::1]:80"
        );
    }

    #[test]
    fn other_names_are_lowercased_and_kept() {
        assert_eq!(key("Example.COM."), "example.com");
        assert_eq!(key("a.b.c.d"), "a.b.c.d");
    }

    #[test]
    fn bad_authorities_say_what_is_wrong() {
        assert_eq!(normalize(""), Err(AuthorityError::Empty));
        assert_eq!(normalize(":80"), Err(AuthorityError::Empty));
        assert!(matches!(
            normalize("web.shop:http"),
            Err(AuthorityError::InvalidPort { .. })
        ));
        assert!(matches!(
            normalize("web.shop:99999"),
            Err(AuthorityError::InvalidPort { .. })
        ));
        assert!(matches!(
            normalize("web..shop"),
            Err(AuthorityError::InvalidHost { .. })
        ));
        assert!(matches!(
            normalize("we b.shop"),
            Err(AuthorityError::InvalidHost { .. })
        ));
        assert!(matches!(
            normalize("[fd00::1"),
            Err(AuthorityError::InvalidHost { .. })
        ));
        let msg = normalize("web.shop:http").unwrap_err().to_string();
        assert!(msg.contains("\"http\""), "{msg}");
    }
}
