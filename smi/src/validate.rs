//! Validation of normalized policies, per SPEC-NOTES: what the schema cannot say. A
//! TrafficPolicy's settings are checked by `trellis_policy` (ranges, combinations such as a
//! retried POST without `allowNonIdempotent`); here they get their place in the document.
//!
//! Per resource ([`validate_policy`]): names present, at least one backend, ServiceAccount
//! identities, TrafficTarget v1alpha3 with at least one rule and one source, ports 1-65535,
//! known HTTP methods, unique match names, and regexes that compile under Trellis's limits; an
//! ExternalService's hosts, ports, caBundle, addresses and sources
//! ([`check_dns_name`], [`check_pem_certificates`]).
//! Across resources ([`validate_references`]): route groups and match names a split, a target or
//! a TrafficPolicy's route section names must exist in the same namespace. Shape errors (types, missing or unknown fields, bad
//! weights, unknown rule kinds) are caught earlier, while deserializing.
//!
//! Paths in [`Issue`]s use the newest wire shape (`spec.rules[0]`); [`crate::load`] maps them
//! onto the document's own version.

use crate::model::{
    ExternalProtocol, ExternalService, HttpRouteGroup, Kind, Policy, PortRoute, RouteKind,
    TrafficPolicy, effective_namespace,
};
use crate::path::FieldPath;
use regex::{Regex, RegexBuilder};
use std::collections::{HashMap, HashSet};

/// Compiled-size limit for user regexes (path and header values). The `regex` crate matches in
/// linear time; this bounds memory and compile time too.
pub const REGEX_SIZE_LIMIT: usize = 256 * 1024;
/// Longest regex source accepted.
pub const REGEX_MAX_LEN: usize = 4096;

/// HTTP methods an HTTPRouteGroup may name (`*` = all), as in the CRD schema.
pub const HTTP_METHODS: [&str; 10] = [
    "*", "GET", "HEAD", "PUT", "POST", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// One problem found in a resource: the field and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issue {
    pub field: FieldPath,
    pub message: String,
}

impl Issue {
    fn new(field: FieldPath, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

/// Compiles a user regex the way Trellis matches it: anchored at both ends, linear time,
/// size-limited. The controller and the proxy config use this same function.
pub fn compile_anchored(pattern: &str) -> Result<Regex, String> {
    if pattern.len() > REGEX_MAX_LEN {
        return Err(format!(
            "regex is too long ({} bytes, at most {REGEX_MAX_LEN})",
            pattern.len()
        ));
    }
    RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| match e {
            regex::Error::CompiledTooBig(_) => {
                format!("regex is too large: it compiles to more than {REGEX_SIZE_LIMIT} bytes")
            }
            // The syntax error text is multi-line (it draws the pattern); keep the reason.
            other => {
                let text = other.to_string();
                let reason = text
                    .lines()
                    .rev()
                    .find(|l| l.starts_with("error:"))
                    .unwrap_or(&text);
                format!(
                    "invalid regex {pattern:?}: {}",
                    reason.trim_start_matches("error: ")
                )
            }
        })
}

/// Remembers which regexes compiled, so a policy set that repeats a pattern (every namespace
/// with the same route group) pays for compiling it once.
#[derive(Debug, Default)]
pub struct RegexChecks {
    results: HashMap<String, Result<(), String>>,
}

impl RegexChecks {
    /// Whether `pattern` compiles under [`compile_anchored`], and why not.
    pub fn check(&mut self, pattern: &str) -> Result<(), String> {
        if let Some(result) = self.results.get(pattern) {
            return result.clone();
        }
        let result = compile_anchored(pattern).map(drop);
        self.results.insert(pattern.to_owned(), result.clone());
        result
    }
}

/// Checks one policy on its own. `version` is the version it was written in (some rules apply
/// only to some versions).
pub fn validate_policy(policy: &Policy, version: &str) -> Vec<Issue> {
    validate_policy_with(policy, version, &mut RegexChecks::default())
}

/// [`validate_policy`] reusing the regex results of earlier policies.
pub fn validate_policy_with(
    policy: &Policy,
    version: &str,
    regexes: &mut RegexChecks,
) -> Vec<Issue> {
    let mut issues = Vec::new();
    let metadata = policy.metadata();
    if metadata.name.as_deref().is_none_or(str::is_empty) {
        issues.push(Issue::new(FieldPath::parse("metadata.name"), "is required"));
    }
    match policy {
        Policy::TrafficSplit(split) => {
            if split.service.is_empty() {
                issues.push(Issue::new(
                    FieldPath::parse("spec.service"),
                    "must name the root service",
                ));
            }
            if split.backends.is_empty() {
                issues.push(Issue::new(
                    FieldPath::parse("spec.backends"),
                    "must list at least one backend",
                ));
            }
            for (i, backend) in split.backends.iter().enumerate() {
                if backend.service.is_empty() {
                    let field = FieldPath::parse("spec.backends").index(i).key("service");
                    issues.push(Issue::new(field, "must name a service"));
                }
            }
            for (i, group) in split.matches.iter().enumerate() {
                if group.name.is_empty() {
                    let field = FieldPath::parse("spec.matches").index(i).key("name");
                    issues.push(Issue::new(field, "must name an HTTPRouteGroup"));
                }
            }
        }
        Policy::AccessPolicy(target) => {
            let destination = FieldPath::parse("spec.destination");
            check_identity(
                &mut issues,
                &destination,
                &target.destination.kind,
                &target.destination.name,
            );
            if target.destination_port == Some(0) {
                issues.push(Issue::new(
                    destination.key("port"),
                    "must be a port number 1-65535, got 0",
                ));
            }
            for (i, source) in target.sources.iter().enumerate() {
                check_identity(
                    &mut issues,
                    &FieldPath::parse("spec.sources").index(i),
                    &source.kind,
                    &source.name,
                );
            }
            if version == "v1alpha3" {
                if target.rules.is_empty() {
                    issues.push(Issue::new(
                        FieldPath::parse("spec.rules"),
                        "must list at least one rule",
                    ));
                }
                if target.sources.is_empty() {
                    issues.push(Issue::new(
                        FieldPath::parse("spec.sources"),
                        "must list at least one source",
                    ));
                }
            }
            for (i, rule) in target.rules.iter().enumerate() {
                let field = FieldPath::parse("spec.rules").index(i);
                if rule.name.is_empty() {
                    issues.push(Issue::new(
                        field.key("name"),
                        format!("must name a {}", rule.kind.kind()),
                    ));
                }
            }
        }
        Policy::HttpRouteGroup(group) => check_route_group(&mut issues, group, regexes),
        Policy::TcpRoute(route) | Policy::UdpRoute(route) => check_ports(&mut issues, route),
        Policy::TrafficPolicy(policy) => check_traffic_policy(&mut issues, policy),
        Policy::ExternalService(external) => check_external_service(&mut issues, external),
    }
    issues
}

/// An ExternalService on its own: hosts are DNS names, each once; ports each once, with
/// `originateTls` only on `http` ports; a `caBundle` of PEM certificates, only with
/// `originateTls`; IP addresses; at least one ServiceAccount source. Two ExternalServices
/// declaring one `host:port` is a problem of the merged policy (the controller's index).
fn check_external_service(issues: &mut Vec<Issue>, external: &ExternalService) {
    let hosts = FieldPath::parse("spec.hosts");
    if external.hosts.is_empty() {
        issues.push(Issue::new(hosts.clone(), "must list at least one host"));
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, host) in external.hosts.iter().enumerate() {
        if let Err(reason) = check_dns_name(host) {
            issues.push(Issue::new(hosts.index(i), reason));
        } else if let Some(first) = seen.insert(host, i) {
            issues.push(Issue::new(
                hosts.index(i),
                format!("host {host:?} is listed twice (also spec.hosts[{first}])"),
            ));
        }
    }
    let ports = FieldPath::parse("spec.ports");
    if external.ports.is_empty() {
        issues.push(Issue::new(ports.clone(), "must list at least one port"));
    }
    let mut seen: HashMap<u16, usize> = HashMap::new();
    for (i, port) in external.ports.iter().enumerate() {
        let field = ports.index(i);
        if port.port == 0 {
            issues.push(Issue::new(
                field.key("port"),
                "must be a port number 1-65535, got 0",
            ));
        } else if let Some(first) = seen.insert(port.port, i) {
            issues.push(Issue::new(
                field.key("port"),
                format!(
                    "port {} is declared twice (also spec.ports[{first}])",
                    port.port
                ),
            ));
        }
        if let Some(tls) = &port.originate_tls {
            if port.protocol != ExternalProtocol::Http {
                issues.push(Issue::new(
                    field.key("originateTls"),
                    format!(
                        "only an http port can originate TLS, this one is {} ({})",
                        port.protocol.as_str(),
                        match port.protocol {
                            ExternalProtocol::Tls => "the application's own TLS passes through",
                            _ => "opaque bytes pass through unchanged",
                        }
                    ),
                ));
            }
            if tls.port == 0 {
                issues.push(Issue::new(
                    field.key("originateTls").key("port"),
                    "must be a port number 1-65535, got 0",
                ));
            }
        }
    }
    if let Some(bundle) = &external.ca_bundle {
        let field = FieldPath::parse("spec.caBundle");
        if !external.ports.iter().any(|p| p.originate_tls.is_some()) {
            issues.push(Issue::new(
                field.clone(),
                "is only used by ports with originateTls, and none has it",
            ));
        }
        if let Err(reason) = check_pem_certificates(bundle) {
            issues.push(Issue::new(field, reason));
        }
    }
    let mut seen: HashMap<std::net::IpAddr, usize> = HashMap::new();
    for (i, address) in external.addresses.iter().enumerate() {
        let field = FieldPath::parse("spec.addresses").index(i);
        match address.parse::<std::net::IpAddr>() {
            Err(_) => issues.push(Issue::new(
                field,
                format!(
                    "{address:?} is not an IP address (addresses are fixed IPs; names go in hosts)"
                ),
            )),
            Ok(ip) => {
                if let Some(first) = seen.insert(ip, i) {
                    issues.push(Issue::new(
                        field,
                        format!("{address} is listed twice (also spec.addresses[{first}])"),
                    ));
                }
            }
        }
    }
    if external.sources.is_empty() {
        issues.push(Issue::new(
            FieldPath::parse("spec.sources"),
            "must list at least one source (the service accounts allowed to call it)",
        ));
    }
    for (i, source) in external.sources.iter().enumerate() {
        let field = FieldPath::parse("spec.sources").index(i);
        check_identity(issues, &field, &source.kind, &source.name);
        // Only "every workload of the mesh" can be a wildcard: the proxy admits exact identities
        // or anyone, so a namespace's every service account (or one name in every namespace)
        // could only be refused at call time, which would look like a bug; refused here instead.
        let wild_name = source.name == "*";
        let wild_namespace = source.namespace.as_deref() == Some("*");
        if wild_name != wild_namespace {
            let (key, what) = if wild_name {
                ("namespace", "name \"*\" needs namespace \"*\" too")
            } else {
                ("name", "namespace \"*\" needs name \"*\" too")
            };
            issues.push(Issue::new(
                field.key(key),
                format!(
                    "{what}: a wildcard source means every workload of the mesh; list one \
                     namespace's service accounts by name"
                ),
            ));
        }
    }
}

/// Whether `host` is a DNS name an ExternalService can declare: lower-case letters, digits and
/// hyphens in dot-separated labels of 1-63 characters (no hyphen at either end), at most 253
/// characters, not an IP address, no wildcard.
pub fn check_dns_name(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("must not be empty".into());
    }
    if host.len() > 253 {
        return Err(format!(
            "{host:?} is not a DNS name: longer than 253 characters"
        ));
    }
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!(
            "{host:?} is an IP address, not a host name (fixed IPs go in spec.addresses)"
        ));
    }
    if host.starts_with("*.") {
        return Err(format!(
            "{host:?}: wildcards are not supported, list each host name"
        ));
    }
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!(
            "{host:?} must be lower case (DNS names are compared in lower case)"
        ));
    }
    for label in host.split('.') {
        let valid = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !valid {
            return Err(format!(
                "{host:?} is not a DNS name: label {label:?} must be 1-63 letters, digits or inner hyphens"
            ));
        }
    }
    Ok(())
}

/// Whether `bundle` is one or more PEM `CERTIFICATE` blocks that parse as X.509, and only that.
pub fn check_pem_certificates(bundle: &str) -> Result<(), String> {
    let blocks = pem::parse_many(bundle).map_err(|e| format!("is not PEM: {e}"))?;
    if blocks.is_empty() {
        return Err(
            "holds no PEM certificate (expected -----BEGIN CERTIFICATE----- blocks)".into(),
        );
    }
    for (i, block) in blocks.iter().enumerate() {
        if block.tag() != "CERTIFICATE" {
            return Err(format!(
                "PEM block {} is a {:?}, not a CERTIFICATE",
                i + 1,
                block.tag()
            ));
        }
        if let Err(e) = x509_parser::parse_x509_certificate(block.contents()) {
            return Err(format!(
                "PEM block {} is not an X.509 certificate: {e}",
                i + 1
            ));
        }
    }
    Ok(())
}

/// A TrafficPolicy: its target, its settings (`trellis_policy`'s checks, with their field
/// paths under `spec.` and `spec.routes[i].`), and its route sections' group names.
fn check_traffic_policy(issues: &mut Vec<Issue>, policy: &TrafficPolicy) {
    let target = FieldPath::parse("spec.targetRef");
    if policy.target_ref.name.is_empty() {
        issues.push(Issue::new(target.key("name"), "must name a Service"));
    }
    if let Some(kind) = &policy.target_ref.kind
        && kind != "Service"
    {
        issues.push(Issue::new(
            target.key("kind"),
            format!("must be Service (a TrafficPolicy applies to a Service), got {kind:?}"),
        ));
    }
    if let Some(group) = &policy.target_ref.group
        && !group.is_empty()
    {
        issues.push(Issue::new(
            target.key("group"),
            format!("must be empty (the core group of Service), got {group:?}"),
        ));
    }
    let problem = |p: trellis_policy::Problem| Issue::new(FieldPath::parse(&p.field), p.message);
    issues.extend(
        trellis_policy::validate_destination(&policy.policy, "spec")
            .into_iter()
            .map(problem),
    );
    if let Some(jwt) = &policy.jwt {
        issues.extend(
            trellis_policy::jwt::validate_jwt(jwt, "spec.jwt")
                .into_iter()
                .map(problem),
        );
        // The proxies read the file on their own hosts, from their own working directory: a
        // relative path would mean a different file on each.
        for (i, provider) in jwt.providers.iter().enumerate() {
            if let Some(file) = &provider.jwks.file
                && !file.as_os_str().is_empty()
                && !file.is_absolute()
            {
                issues.push(Issue::new(
                    FieldPath::parse(&format!("spec.jwt.providers[{i}].jwks.file")),
                    format!(
                        "{:?} is relative: write the absolute path of the JWKS file on the proxies' hosts",
                        file.display().to_string()
                    ),
                ));
            }
        }
    }
    // Claims without `jwt`: no request would have verified claims, so the service (or route)
    // would refuse every request; said here rather than found in production.
    let needs_jwt = "a claim condition needs spec.jwt: without it no request has verified claims, and every request it covers would be refused";
    if !policy.claims.is_empty() && policy.jwt.is_none() {
        issues.push(Issue::new(FieldPath::parse("spec.claims"), needs_jwt));
    }
    issues.extend(
        trellis_policy::jwt::validate_claims(&policy.claims, "spec.claims")
            .into_iter()
            .map(problem),
    );
    for (i, route) in policy.routes.iter().enumerate() {
        let field = FieldPath::parse("spec.routes").index(i);
        if route.http_route_group.is_empty() {
            issues.push(Issue::new(
                field.key("httpRouteGroup"),
                "must name an HTTPRouteGroup",
            ));
        }
        issues.extend(
            trellis_policy::validate_route(&route.policy, &format!("spec.routes[{i}]"))
                .into_iter()
                .map(problem),
        );
        if !route.claims.is_empty() && policy.jwt.is_none() {
            issues.push(Issue::new(field.key("claims"), needs_jwt));
        }
        issues.extend(
            trellis_policy::jwt::validate_claims(
                &route.claims,
                &format!("spec.routes[{i}].claims"),
            )
            .into_iter()
            .map(problem),
        );
    }
}

fn check_identity(issues: &mut Vec<Issue>, field: &FieldPath, kind: &str, name: &str) {
    if kind != "ServiceAccount" {
        issues.push(Issue::new(
            field.key("kind"),
            format!(
                "must be ServiceAccount (Trellis identities are service accounts), got {kind:?}"
            ),
        ));
    }
    if name.is_empty() {
        issues.push(Issue::new(field.key("name"), "must name a service account"));
    }
}

fn check_route_group(issues: &mut Vec<Issue>, group: &HttpRouteGroup, regexes: &mut RegexChecks) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, m) in group.matches.iter().enumerate() {
        let field = FieldPath::parse("spec.matches").index(i);
        if m.name.is_empty() {
            issues.push(Issue::new(field.key("name"), "must not be empty"));
        } else if let Some(first) = seen.insert(&m.name, i) {
            issues.push(Issue::new(
                field.key("name"),
                format!(
                    "duplicate match name {:?} (also spec.matches[{first}])",
                    m.name
                ),
            ));
            seen.insert(&m.name, first);
        }
        if let Some(pattern) = &m.path_regex
            && let Err(reason) = regexes.check(pattern)
        {
            issues.push(Issue::new(field.key("pathRegex"), reason));
        }
        for (j, method) in m.methods.iter().flatten().enumerate() {
            if !HTTP_METHODS.contains(&method.as_str()) {
                issues.push(Issue::new(
                    field.key("methods").index(j),
                    format!(
                        "unknown HTTP method {method:?} (expected one of {})",
                        HTTP_METHODS.join(", ")
                    ),
                ));
            }
        }
        for (j, header) in m.headers.iter().enumerate() {
            let header_field = field.key("headers").index(j);
            if header.name.is_empty() || !header.name.bytes().all(is_header_name_byte) {
                issues.push(Issue::new(
                    header_field.clone(),
                    format!("invalid header name {:?}", header.name),
                ));
            }
            if let Err(reason) = regexes.check(&header.value) {
                issues.push(Issue::new(
                    header_field,
                    format!("header {:?}: {reason}", header.name),
                ));
            }
        }
    }
}

fn is_header_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn check_ports(issues: &mut Vec<Issue>, route: &PortRoute) {
    for (i, port) in route.ports.iter().enumerate() {
        if *port == 0 {
            let field = FieldPath::parse("spec.matches.ports").index(i);
            issues.push(Issue::new(field, "must be a port number 1-65535, got 0"));
        }
    }
}

/// The match names of every route resource in a set, by (kind, namespace, name).
#[derive(Debug, Default)]
pub struct RouteIndex {
    routes: HashMap<(Kind, String, String), HashSet<String>>,
}

impl RouteIndex {
    /// Indexes the route resources among `policies`.
    pub fn new<'a>(policies: impl IntoIterator<Item = &'a Policy>) -> Self {
        let mut index = RouteIndex::default();
        for policy in policies {
            let names: HashSet<String> = match policy {
                Policy::HttpRouteGroup(g) => g.matches.iter().map(|m| m.name.clone()).collect(),
                Policy::TcpRoute(_) | Policy::UdpRoute(_) => HashSet::new(),
                _ => continue,
            };
            let metadata = policy.metadata();
            let key = (
                policy.kind(),
                effective_namespace(metadata).to_owned(),
                metadata.name.clone().unwrap_or_default(),
            );
            index.routes.insert(key, names);
        }
        index
    }

    fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<&HashSet<String>> {
        self.routes
            .get(&(kind, namespace.to_owned(), name.to_owned()))
    }
}

/// Checks that the route resources and match names `policy` refers to exist in `routes`
/// (same namespace as the policy).
pub fn validate_references(policy: &Policy, routes: &RouteIndex) -> Vec<Issue> {
    let mut issues = Vec::new();
    let namespace = effective_namespace(policy.metadata());
    match policy {
        Policy::TrafficSplit(split) => {
            for (i, group) in split.matches.iter().enumerate() {
                if !group.name.is_empty()
                    && routes
                        .get(Kind::HttpRouteGroup, namespace, &group.name)
                        .is_none()
                {
                    issues.push(Issue::new(
                        FieldPath::parse("spec.matches").index(i).key("name"),
                        format!("HTTPRouteGroup {namespace}/{} does not exist", group.name),
                    ));
                }
            }
        }
        Policy::AccessPolicy(target) => {
            for (i, rule) in target.rules.iter().enumerate() {
                if rule.name.is_empty() {
                    continue;
                }
                let field = FieldPath::parse("spec.rules").index(i);
                let kind = rule.kind.kind();
                let Some(match_names) = routes.get(kind, namespace, &rule.name) else {
                    issues.push(Issue::new(
                        field.key("name"),
                        format!("{kind} {namespace}/{} does not exist", rule.name),
                    ));
                    continue;
                };
                if rule.kind != RouteKind::HttpRouteGroup {
                    continue; // TCPRoute/UDPRoute matches carry no names to check.
                }
                for (j, name) in rule.matches.iter().flatten().enumerate() {
                    if !match_names.contains(name) {
                        issues.push(Issue::new(
                            field.key("matches").index(j),
                            format!(
                                "HTTPRouteGroup {namespace}/{} has no match named {name:?}",
                                rule.name
                            ),
                        ));
                    }
                }
            }
        }
        Policy::TrafficPolicy(policy) => {
            for (i, route) in policy.routes.iter().enumerate() {
                if route.http_route_group.is_empty() {
                    continue;
                }
                let field = FieldPath::parse("spec.routes").index(i);
                let group = &route.http_route_group;
                let Some(match_names) = routes.get(Kind::HttpRouteGroup, namespace, group) else {
                    issues.push(Issue::new(
                        field.key("httpRouteGroup"),
                        format!("HTTPRouteGroup {namespace}/{group} does not exist"),
                    ));
                    continue;
                };
                for (j, name) in route.matches.iter().flatten().enumerate() {
                    if !match_names.contains(name) {
                        issues.push(Issue::new(
                            field.key("matches").index(j),
                            format!(
                                "HTTPRouteGroup {namespace}/{group} has no match named {name:?}"
                            ),
                        ));
                    }
                }
            }
        }
        _ => {}
    }
    issues
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regexes_are_anchored_and_limited() {
        let re = compile_anchored("/api/.*").unwrap();
        assert!(re.is_match("/api/x"));
        assert!(!re.is_match("/x/api/x"));
        assert!(
            compile_anchored("(")
                .unwrap_err()
                .starts_with("invalid regex \"(\"")
        );
        let huge = "a{1000}{1000}";
        assert!(compile_anchored(huge).unwrap_err().contains("too large"));
        assert!(
            compile_anchored(&"a".repeat(REGEX_MAX_LEN + 1))
                .unwrap_err()
                .contains("too long")
        );
    }
}
