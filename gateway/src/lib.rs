//! # trellis-gateway: the `policy.trellis.io/v1alpha1` Gateway resource
//!
//! The ingress gateway (a `trellis-proxy` in gateway mode) is configured the same way on every
//! platform: one Gateway document, a CRD object on Kubernetes (its ConfigMap copy is what the
//! gateway reads), a file elsewhere, given to `trellis-proxy --gateway FILE`:
//!
//! ```yaml
//! apiVersion: policy.trellis.io/v1alpha1
//! kind: Gateway
//! metadata: {name: public, namespace: shop}
//! spec:
//!   https: {port: 8443}
//!   httpRedirect: {port: 8080}
//!   certificates:
//!     - hosts: [shop.example.com, "*.shop.example.com"]
//!       secretName: shop-tls        # Kubernetes: the Secret mounted at /etc/trellis/gateway/tls/shop-tls
//!     - hosts: [api.example.com]
//!       certFile: /etc/tls/api.crt  # any platform: PEM files
//!       keyFile: /etc/tls/api.key
//!   routes:
//!     - host: shop.example.com
//!       pathPrefix: /api
//!       service: {name: api, port: 8080}
//!     - host: shop.example.com
//!       service: {name: web, port: 80}
//! ```
//!
//! Why a crate of its own: the spec is read by two sides that may not depend on each other (the
//! layout rules keep `trellis-smi` and every `kube` crate out of the proxy). `trellis-smi` wraps
//! these types in the CRD (schema derived from them, feature `schema`), `trellis validate` checks
//! documents with [`GatewaySpec::validate`], and the proxy reads documents with [`read`] and
//! compiles the spec into its own gateway configuration. One set of types means the CRD, the
//! validator and the proxy cannot disagree about what a field is called or what it holds.
//!
//! A route's `service` names a mesh service by name, namespace (the Gateway's own by default) and
//! port; the proxy reaches it as the authority `name.namespace:port`
//! ([`ServiceRef::authority`]), which the controller resolves on every platform (Kubernetes
//! Services, Consul and Cloud Map services, file-defined services all normalize to
//! `name.namespace`), and which a static configuration's destinations can name too.

#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

/// The resource's API group.
pub const GROUP: &str = "policy.trellis.io";
/// The resource's version (the only one).
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of a Gateway document.
pub const API_VERSION: &str = "policy.trellis.io/v1alpha1";
/// `kind` of a Gateway document.
pub const KIND: &str = "Gateway";
/// The namespace of a Gateway whose metadata names none.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Where a certificate's `secretName` is found: `<dir>/<secretName>/tls.crt` and `tls.key`
/// (what `trellis install` mounts a `kubernetes.io/tls` Secret as).
pub const SECRET_MOUNT_DIR: &str = "/etc/trellis/gateway/tls";

/// The spec of a Gateway.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewaySpec {
    /// The HTTPS listener: TLS terminated with the certificate the client's SNI names, HTTP/1.1
    /// and h2 (gRPC) by ALPN.
    pub https: Listener,
    /// A plain HTTP listener answering every request with `308` to the same host and path over
    /// HTTPS. Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_redirect: Option<Listener>,
    /// The certificates and the host names (SNI) each serves. A client naming no listed host is
    /// refused in the handshake.
    pub certificates: Vec<Certificate>,
    /// Which mesh service serves each host and path prefix. Within a host the longest matching
    /// prefix wins; a host with no route gets `404 unknown-host`, a path no prefix of its host
    /// matches gets `404 no-route`.
    pub routes: Vec<Route>,
    /// End-user authentication of every request (the `jwt` of an inbound policy, same fields):
    /// checked before routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(schema_with = "any_object"))]
    pub jwt: Option<trellis_jwt::JwtPolicy>,
}

/// In the CRD's schema, `jwt` is an object the API server keeps as written: its fields are
/// checked by `trellis validate` and the gateway (trellis-jwt), which owns them.
#[cfg(feature = "schema")]
fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "nullable": true,
        "x-kubernetes-preserve-unknown-fields": true,
        "description": "End-user JWT authentication (providers, required), as in an inbound policy's jwt.",
    })
}

/// A listener of the gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listener {
    /// The port (1-65535).
    pub port: u16,
    /// The address to bind; absent: every IPv4 address (`0.0.0.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
}

impl Listener {
    /// Where to bind.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(
            self.address.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            self.port,
        )
    }
}

/// A certificate and the host names it serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Certificate {
    /// Host names (SNI), exact or `*.` one-label wildcards.
    pub hosts: Vec<String>,
    /// The certificate chain, leaf first (PEM). With `keyFile`; or leave both out and name a
    /// `secretName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<String>,
    /// The leaf's private key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
    /// A `kubernetes.io/tls` Secret in the Gateway's namespace: `trellis install` mounts it at
    /// `/etc/trellis/gateway/tls/<secretName>/`, and without `certFile`/`keyFile` the gateway
    /// reads `tls.crt` and `tls.key` there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
}

impl Certificate {
    /// The certificate and key files the gateway reads: `certFile`/`keyFile`, else the
    /// Secret's mount. `None` when neither is given (refused by [`GatewaySpec::validate`]).
    pub fn files(&self) -> Option<(String, String)> {
        match (&self.cert_file, &self.key_file, &self.secret_name) {
            (Some(cert), Some(key), _) => Some((cert.clone(), key.clone())),
            (None, None, Some(secret)) => Some((
                format!("{SECRET_MOUNT_DIR}/{secret}/tls.crt"),
                format!("{SECRET_MOUNT_DIR}/{secret}/tls.key"),
            )),
            _ => None,
        }
    }
}

/// A host (and path prefix) of the gateway and the mesh service behind it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Route {
    /// The host clients name (`Host` / `:authority`, the port ignored), exact.
    pub host: String,
    /// The path prefix, by whole segments: `/api` matches `/api` and `/api/x`, not `/apix`.
    /// Absent: `/` (every path). Within a host the longest matching prefix wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// The mesh service requests go to (its TrafficSplit, routes and policies apply).
    pub service: ServiceRef,
}

impl Route {
    /// The path prefix, `/` when absent, without trailing slashes (`/api/` is `/api`).
    pub fn prefix(&self) -> String {
        normalize_prefix(self.path_prefix.as_deref().unwrap_or("/"))
    }
}

/// `prefix` without trailing slashes (segments are compared whole, so `/api/` and `/api` are
/// one prefix); `/` stays.
pub fn normalize_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim().trim_end_matches('/');
    if trimmed.is_empty() {
        "/".into()
    } else {
        trimmed.into()
    }
}

/// A mesh service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceRef {
    /// The service's name.
    pub name: String,
    /// Its namespace; absent: the Gateway's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The service port requests go to.
    pub port: u16,
}

impl ServiceRef {
    /// The authority the proxy routes to: `name.namespace:port`, the spelling every platform's
    /// names normalize to (see the crate docs).
    pub fn authority(&self, gateway_namespace: &str) -> String {
        let namespace = self.namespace.as_deref().unwrap_or(gateway_namespace);
        format!(
            "{}.{}:{}",
            self.name.trim().to_ascii_lowercase(),
            namespace.trim().to_ascii_lowercase(),
            self.port
        )
    }
}

/// A problem found by [`GatewaySpec::validate`]: the field (under `spec`, e.g.
/// `routes[1].pathPrefix`) and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The field's path within the spec.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl GatewaySpec {
    /// Every problem of the spec (empty: valid). Checks what serde cannot: names, ports, that
    /// each certificate has its files, that no host or (host, prefix) is named twice, that
    /// every route's host has a certificate (else no client could reach it), and the JWT policy.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut fail = |field: String, message: String| problems.push(Problem { field, message });
        if self.https.port == 0 {
            fail("https.port".into(), "must be 1-65535".into());
        }
        if let Some(redirect) = &self.http_redirect {
            if redirect.port == 0 {
                fail("httpRedirect.port".into(), "must be 1-65535".into());
            } else if redirect.socket_addr() == self.https.socket_addr() {
                fail(
                    "httpRedirect.port".into(),
                    "is the HTTPS listener's port".into(),
                );
            }
        }
        let mut exact = HashSet::new();
        let mut wildcards = HashSet::new();
        for (c, cert) in self.certificates.iter().enumerate() {
            if cert.hosts.is_empty() {
                fail(
                    format!("certificates[{c}].hosts"),
                    "a certificate must name at least one host".into(),
                );
            }
            for (h, host) in cert.hosts.iter().enumerate() {
                let name = host.trim().to_ascii_lowercase();
                let (set, bare) = match name.strip_prefix("*.") {
                    Some(rest) => (&mut wildcards, rest.to_string()),
                    None => (&mut exact, name.clone()),
                };
                if let Err(e) = check_dns_name(&bare) {
                    fail(
                        format!("certificates[{c}].hosts[{h}]"),
                        format!("{host:?}: {e}"),
                    );
                } else if !set.insert(bare) {
                    fail(
                        format!("certificates[{c}].hosts[{h}]"),
                        format!("{host:?} is named by two certificates"),
                    );
                }
            }
            match (&cert.cert_file, &cert.key_file, &cert.secret_name) {
                (Some(_), None, _) => fail(
                    format!("certificates[{c}].keyFile"),
                    "certFile needs keyFile".into(),
                ),
                (None, Some(_), _) => fail(
                    format!("certificates[{c}].certFile"),
                    "keyFile needs certFile".into(),
                ),
                (None, None, None) => fail(
                    format!("certificates[{c}]"),
                    "name certFile and keyFile, or a secretName".into(),
                ),
                _ => {}
            }
            for (field, file) in [("certFile", &cert.cert_file), ("keyFile", &cert.key_file)] {
                if file.as_deref().is_some_and(|f| f.trim().is_empty()) {
                    fail(format!("certificates[{c}].{field}"), "is empty".into());
                }
            }
            if let Some(secret) = &cert.secret_name
                && let Err(e) = check_dns_name(secret)
            {
                fail(
                    format!("certificates[{c}].secretName"),
                    format!("{secret:?}: {e}"),
                );
            }
        }
        let covered = |host: &str| {
            exact.contains(host)
                || host
                    .split_once('.')
                    .is_some_and(|(_, parent)| wildcards.contains(parent))
        };
        let mut routes: HashMap<(String, String), usize> = HashMap::new();
        for (r, route) in self.routes.iter().enumerate() {
            let host = route.host.trim().to_ascii_lowercase();
            if let Err(e) = check_dns_name(&host) {
                fail(
                    format!("routes[{r}].host"),
                    format!("{:?}: {e}", route.host),
                );
            } else if !covered(&host) {
                fail(
                    format!("routes[{r}].host"),
                    format!(
                        "{:?} is served by no certificate: clients could not reach it",
                        route.host
                    ),
                );
            }
            if let Some(prefix) = &route.path_prefix
                && let Err(e) = check_prefix(prefix)
            {
                fail(
                    format!("routes[{r}].pathPrefix"),
                    format!("{prefix:?}: {e}"),
                );
            }
            if let Some(first) = routes.insert((host, route.prefix()), r) {
                fail(
                    format!("routes[{r}]"),
                    format!(
                        "host {:?} with path prefix {:?} is routed by routes[{first}] already",
                        route.host,
                        route.prefix()
                    ),
                );
            }
            if let Err(e) = check_label(&route.service.name) {
                fail(
                    format!("routes[{r}].service.name"),
                    format!("{:?}: {e}", route.service.name),
                );
            }
            if let Some(namespace) = &route.service.namespace
                && let Err(e) = check_label(namespace)
            {
                fail(
                    format!("routes[{r}].service.namespace"),
                    format!("{namespace:?}: {e}"),
                );
            }
            if route.service.port == 0 {
                fail(
                    format!("routes[{r}].service.port"),
                    "must be 1-65535".into(),
                );
            }
        }
        if let Some(jwt) = &self.jwt {
            for p in jwt.validate() {
                fail(format!("jwt.{}", p.field), p.message);
            }
        }
        problems
    }
}

fn check_prefix(prefix: &str) -> Result<(), &'static str> {
    if !prefix.starts_with('/') {
        return Err("must start with /");
    }
    if prefix
        .bytes()
        .any(|b| b == b'?' || b == b'#' || b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err("a path prefix has no query, fragment, spaces or control characters");
    }
    Ok(())
}

/// A lowercase DNS name (RFC 1123 labels, dot-separated).
fn check_dns_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 253 {
        return Err("must be a DNS name of 1 to 253 characters");
    }
    name.split('.').try_for_each(check_label)
}

/// One lowercase RFC 1123 label (what Kubernetes names Services and namespaces with).
fn check_label(label: &str) -> Result<(), &'static str> {
    let ok = !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err("must be lowercase letters, digits and '-' (RFC 1123 labels of 1 to 63 characters)")
    }
}

/// A whole Gateway document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayDocument {
    /// `policy.trellis.io/v1alpha1`.
    pub api_version: String,
    /// `Gateway`.
    pub kind: String,
    /// Name and namespace (other metadata, e.g. labels, is allowed and ignored).
    pub metadata: Metadata,
    /// The spec.
    pub spec: GatewaySpec,
}

/// The metadata a Gateway document is read for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// The Gateway's name.
    #[serde(default)]
    pub name: String,
    /// Its namespace: the default of its routes' services (absent: `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

impl GatewayDocument {
    /// The Gateway's namespace (`default` when the metadata names none).
    pub fn namespace(&self) -> &str {
        self.metadata
            .namespace
            .as_deref()
            .unwrap_or(DEFAULT_NAMESPACE)
    }

    /// Every problem of the document, fields from its root (`apiVersion`, `metadata.namespace`,
    /// `spec.routes[1].host`...); empty: valid.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        if self.api_version != API_VERSION {
            problems.push(Problem {
                field: "apiVersion".into(),
                message: format!("{:?}: expected {API_VERSION}", self.api_version),
            });
        }
        if self.kind != KIND {
            problems.push(Problem {
                field: "kind".into(),
                message: format!("{:?}: expected {KIND}", self.kind),
            });
        }
        if let Some(namespace) = &self.metadata.namespace
            && let Err(e) = check_label(namespace)
        {
            problems.push(Problem {
                field: "metadata.namespace".into(),
                message: format!("{namespace:?}: {e}"),
            });
        }
        problems.extend(self.spec.validate().into_iter().map(|p| Problem {
            field: format!("spec.{}", p.field),
            message: p.message,
        }));
        problems
    }
}

/// Why a Gateway document was refused: its line (0 when unknown), the field and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct DocumentError {
    /// 1-based line of the field (0: unknown).
    pub line: usize,
    /// The Gateway as `namespace/name`, once known.
    pub resource: Option<String>,
    /// The field's path, e.g. `spec.routes[1].pathPrefix` (empty: the document itself).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for DocumentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.line)?;
        if let Some(resource) = &self.resource {
            write!(f, ": {KIND} {resource}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Read and check one Gateway document (YAML or JSON text): located errors, the first problem
/// only. A file holds exactly one document; its `apiVersion` and `kind` must be the Gateway's.
pub fn read(text: &str) -> Result<GatewayDocument, DocumentError> {
    let deserializer = serde_yaml_ng::Deserializer::from_str(text);
    let document: GatewayDocument =
        serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            let line = inner.location().map_or(0, |l| l.line());
            // serde_yaml_ng appends "at line L column C": the line is reported on its own.
            let message = inner.to_string();
            let message = match message.rsplit_once(" at line ") {
                Some((head, _)) => head.to_string(),
                None => message,
            };
            // ... and starts with the path of the map that holds the field (or of the field),
            // which is reported on its own too.
            let message = match message.split_once(": ") {
                Some((path, rest)) if field.starts_with(path) => rest.to_string(),
                _ => message,
            };
            DocumentError {
                line,
                resource: None,
                field: if field == "." { String::new() } else { field },
                message,
            }
        })?;
    let resource = Some(format!(
        "{}/{}",
        document.namespace(),
        document.metadata.name
    ));
    if let Some(p) = document.validate().into_iter().next() {
        return Err(DocumentError {
            line: line_of(text, &p.field),
            resource,
            field: p.field,
            message: p.message,
        });
    }
    Ok(document)
}

/// The 1-based line of `field` (`spec.routes[1].pathPrefix`) in block-style YAML `text`: each
/// key is looked for after the previous one, each `[i]` counts `- ` items. Flow-style parts stop
/// the walk at the line found so far (0 when not even the first key is found).
pub fn line_of(text: &str, field: &str) -> usize {
    let lines: Vec<&str> = text.lines().collect();
    let mut at: Option<usize> = None;
    for segment in field.split('.') {
        let (key, indexes) = match segment.find('[') {
            Some(i) => (&segment[..i], &segment[i..]),
            None => (segment, ""),
        };
        let from = at.map_or(0, |l| l);
        let found = lines.iter().enumerate().skip(from).find(|(_, l)| {
            let t = l.trim_start().trim_start_matches("- ");
            t.starts_with(key) && t[key.len()..].trim_start().starts_with(':')
        });
        let Some((line, _)) = found else {
            return at.map_or(0, |l| l + 1);
        };
        at = Some(line);
        for index in indexes
            .split(['[', ']'])
            .filter(|s| !s.is_empty())
            .filter_map(|s| s.parse::<usize>().ok())
        {
            // Items are the `- ` lines at the indentation of the first one after the key.
            let mut items = lines
                .iter()
                .enumerate()
                .skip(line + 1)
                .filter(|(_, l)| l.trim_start().starts_with("- ") || l.trim() == "-");
            let Some((first, first_line)) = items.next() else {
                return line + 1;
            };
            let indent = first_line.len() - first_line.trim_start().len();
            let nth = std::iter::once((first, first_line))
                .chain(items)
                .filter(|(_, l)| l.len() - l.trim_start().len() == indent)
                .nth(index);
            match nth {
                Some((l, _)) => at = Some(l),
                None => return line + 1,
            }
        }
    }
    at.map_or(0, |l| l + 1)
}

#[cfg(test)]
mod tests;
