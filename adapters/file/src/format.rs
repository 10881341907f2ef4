//! The file format (YAML) and its translation into the endpoint model.
//!
//! ```yaml
//! namespace: demo                 # default namespace of every service (default: "default")
//! services:
//!   - name: web                   # required; `namespace:` here overrides the default
//!     addresses: [10.96.0.10]     # optional: the service's virtual addresses (like a Kubernetes
//!                                 # ClusterIP): a connection to 10.96.0.10:8080 intercepted by a
//!                                 # proxy in transparent mode goes to this service's port 8080
//!     ports:                      # the ports clients address the service on
//!       - { name: http, port: 8080, protocol: http }   # name and protocol optional
//!     endpoints:
//!       - address: 127.0.0.1      # required, IPv4 or IPv6
//!         port: 18081             # one unnamed port, or `ports: [{name: http, port: 18081}]`,
//!                                 # or neither: the service ports as they are
//!         ready: true             # default true; false = NotReady
//!         terminating: false      # default false; true = Terminating (wins over ready)
//!         service_account: web    # default: the service name
//!         labels: { version: v1 } # string values
//!         weight: 100             # optional
//!         zone: local-a           # optional
//!         owner: { kind: Deployment, name: web-v1 }   # default: { kind: Service, name: <service> }
//!         protocol: http          # default: the service's protocol when it has exactly one port
//! ```
//!
//! Virtual addresses (`addresses`) must be unicast and not unspecified, each held by one service
//! only, and never also an endpoint's address (an intercepted connection to it would be
//! ambiguous). Any endpoint address is also found by address: a connection to `10.0.0.1:18080`
//! goes to that endpoint (see [`Catalog::owner`]).
//!
//! Unknown fields are errors (a typo must not silently drop a setting). Every error carries the
//! line and column (serde_yaml_ng reports the position of the offending value, also for the checks
//! below, which run while the document is read) and the field path.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Deserialize;
use trellis_discovery::{
    AddressOwner, Endpoint, EndpointPort, EndpointSet, OwnerRef, ProtocolHint, Provenance,
    Readiness, ServiceKey, ServicePort, SourceId, WorkloadIdentity,
};

/// The namespace of services that name none, when the file names no default either.
pub const DEFAULT_NAMESPACE: &str = "default";

/// What was wrong with the file, and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}{}: {message}", .line.map(|l| format!(":{l}:{}", .column.unwrap_or(1))).unwrap_or_default())]
pub struct ParseError {
    pub file: String,
    /// 1-based line, where the parser knows it.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// What was wrong (with the field path, e.g. `services[0].endpoints[1].address: ...`).
    pub message: String,
}

/// The services of one file, ready to serve watches.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Catalog {
    pub services: BTreeMap<ServiceKey, Arc<EndpointSet>>,
    /// Virtual address -> the service that declared it (`addresses`).
    pub virtual_addresses: BTreeMap<IpAddr, ServiceKey>,
    /// Endpoint address -> the first service (by key) that lists it. Built once per read, so a
    /// lookup by address is one map lookup, not a scan.
    pub endpoint_addresses: BTreeMap<IpAddr, ServiceKey>,
}

impl Catalog {
    /// Who holds `address` in this file: a service's virtual address, an endpoint, or nobody.
    pub fn owner(&self, address: IpAddr) -> AddressOwner {
        if let Some(key) = self.virtual_addresses.get(&address)
            && let Some(set) = self.services.get(key)
        {
            return AddressOwner::Service {
                service: key.clone(),
                ports: set.ports.clone(),
            };
        }
        if let Some(key) = self.endpoint_addresses.get(&address)
            && let Some(set) = self.services.get(key)
            && let Some(endpoint) = set.endpoints.iter().find(|e| e.address == address)
        {
            return AddressOwner::Endpoint {
                service: key.clone(),
                endpoint: Box::new(endpoint.clone()),
            };
        }
        AddressOwner::Unknown
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    services: Vec<ServiceSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceSpec {
    #[serde(default)]
    namespace: Option<String>,
    name: NonEmpty,
    #[serde(default)]
    addresses: Vec<VirtualAddress>,
    #[serde(default)]
    ports: Vec<PortSpec>,
    #[serde(default)]
    endpoints: Vec<EndpointSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortSpec {
    #[serde(default)]
    name: Option<String>,
    port: PortNumber,
    #[serde(default)]
    protocol: Option<Protocol>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointPortSpec {
    #[serde(default)]
    name: Option<String>,
    port: PortNumber,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, try_from = "RawEndpoint")]
struct EndpointSpec {
    address: IpAddr,
    /// `None`: the service ports as they are.
    ports: Option<Vec<EndpointPortSpec>>,
    readiness: Readiness,
    service_account: Option<String>,
    labels: BTreeMap<String, String>,
    weight: Option<u32>,
    zone: Option<String>,
    owner: Option<OwnerSpec>,
    protocol: Option<Protocol>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    address: IpAddr,
    #[serde(default)]
    port: Option<PortNumber>,
    #[serde(default)]
    ports: Option<Vec<EndpointPortSpec>>,
    #[serde(default = "yes")]
    ready: bool,
    #[serde(default)]
    terminating: bool,
    #[serde(default)]
    service_account: Option<NonEmpty>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    owner: Option<OwnerSpec>,
    #[serde(default)]
    protocol: Option<Protocol>,
}

fn yes() -> bool {
    true
}

impl TryFrom<RawEndpoint> for EndpointSpec {
    type Error = String;

    fn try_from(raw: RawEndpoint) -> Result<Self, String> {
        let ports = match (raw.port, raw.ports) {
            (Some(_), Some(_)) => {
                return Err(format!(
                    "endpoint {}: give `port` or `ports`, not both",
                    raw.address
                ));
            }
            (Some(port), None) => Some(vec![EndpointPortSpec { name: None, port }]),
            (None, Some(ports)) if ports.is_empty() => {
                return Err(format!("endpoint {}: `ports` is empty", raw.address));
            }
            (None, ports) => ports,
        };
        let readiness = match (raw.terminating, raw.ready) {
            (true, _) => Readiness::Terminating,
            (false, true) => Readiness::Ready,
            (false, false) => Readiness::NotReady,
        };
        Ok(Self {
            address: raw.address,
            ports,
            readiness,
            service_account: raw.service_account.map(|s| s.0),
            labels: raw.labels,
            weight: raw.weight,
            zone: raw.zone,
            owner: raw.owner,
            protocol: raw.protocol,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OwnerSpec {
    kind: NonEmpty,
    name: NonEmpty,
}

/// A string that must not be empty.
#[derive(Debug)]
struct NonEmpty(String);

impl<'de> Deserialize<'de> for NonEmpty {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(Checked("a non-empty string", |s: &str| {
            if s.trim().is_empty() {
                Err("must not be empty".to_string())
            } else {
                Ok(NonEmpty(s.to_string()))
            }
        }))
    }
}

/// A service's virtual address: an IP a proxy can be asked to reach (unicast, specified).
#[derive(Clone, Copy, Debug)]
struct VirtualAddress(IpAddr);

impl<'de> Deserialize<'de> for VirtualAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(Checked("an IP address", |s: &str| {
            let ip: IpAddr = s
                .trim()
                .parse()
                .map_err(|_| format!("{s:?} is not an IP address (e.g. 10.96.0.10 or fd00::10)"))?;
            let broadcast = ip == IpAddr::V4(std::net::Ipv4Addr::BROADCAST);
            if ip.is_unspecified() || ip.is_multicast() || broadcast {
                return Err(format!(
                    "{ip} cannot be a service address: no connection is ever made to an unspecified, multicast or broadcast address"
                ));
            }
            Ok(VirtualAddress(ip))
        }))
    }
}

/// A port number 1..=65535.
#[derive(Clone, Copy, Debug)]
struct PortNumber(u16);

impl<'de> Deserialize<'de> for PortNumber {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_u64(CheckedNumber(
            "a port number",
            |n: u64| match u16::try_from(n) {
                Ok(p) if p != 0 => Ok(PortNumber(p)),
                _ => Err(format!("port {n} is not in 1..=65535")),
            },
        ))
    }
}

/// A protocol hint, spelled as [`ProtocolHint::parse`] accepts; anything else is an error here (a
/// file is written by a person, who wants to know about a typo).
#[derive(Clone, Copy, Debug)]
struct Protocol(ProtocolHint);

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(Checked("a protocol", |s: &str| {
            ProtocolHint::parse(s)
                .map(Protocol)
                .ok_or_else(|| format!("unknown protocol {s:?}: use http, http2, grpc or tcp"))
        }))
    }
}

/// A visitor that checks a scalar while the parser is on it, so the error carries the scalar's own
/// line and column (a `try_from` check runs later and gets the enclosing mapping's position).
struct Checked<F>(&'static str, F);

impl<'de, T, F: FnOnce(&str) -> Result<T, String>> serde::de::Visitor<'de> for Checked<F> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        (self.1)(v).map_err(E::custom)
    }
}

/// The number flavour of [`Checked`].
struct CheckedNumber<F>(&'static str, F);

impl<'de, T, F: FnOnce(u64) -> Result<T, String>> serde::de::Visitor<'de> for CheckedNumber<F> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<T, E> {
        (self.1)(v).map_err(E::custom)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<T, E> {
        let v = u64::try_from(v).map_err(|_| E::custom(format!("port {v} is not in 1..=65535")))?;
        (self.1)(v).map_err(E::custom)
    }
}

impl fmt::Display for Catalog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} service(s)", self.services.len())
    }
}

/// Parses and checks a whole file. `file` names it in errors; `source` and `loaded_at` become every
/// endpoint's provenance (a file confirms its content when it is read).
pub fn parse(
    yaml: &str,
    file: &Path,
    source: &SourceId,
    loaded_at: SystemTime,
) -> Result<Catalog, ParseError> {
    let error = |line: Option<usize>, column: Option<usize>, message: String| ParseError {
        file: file.display().to_string(),
        line,
        column,
        message,
    };
    if yaml.trim().is_empty() {
        // Most likely caught mid-write; an empty catalog would make every service NotFound.
        return Err(error(None, None, "the file is empty".to_string()));
    }
    let spec: FileSpec = serde_yaml_ng::from_str(yaml).map_err(|e| {
        let location = e.location();
        error(
            location.as_ref().map(|l| l.line()),
            location.as_ref().map(|l| l.column()),
            without_location(&e.to_string()),
        )
    })?;

    let default_namespace = spec
        .namespace
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
    let mut catalog = Catalog::default();
    let mut seen = HashSet::new();
    // Service -> its index in the file, to locate problems found after the loop.
    let mut order: BTreeMap<ServiceKey, usize> = BTreeMap::new();
    for (i, service) in spec.services.into_iter().enumerate() {
        let namespace = service
            .namespace
            .clone()
            .unwrap_or_else(|| default_namespace.clone());
        let key = ServiceKey::new(namespace, service.name.0.clone());
        if !seen.insert(key.clone()) {
            return Err(error(
                line_of_service(yaml, i),
                None,
                format!("services[{i}]: service {key} is listed twice"),
            ));
        }
        let addresses: Vec<IpAddr> = service.addresses.iter().map(|a| a.0).collect();
        let set = service_set(&key, service, source, loaded_at).map_err(|message| {
            error(
                line_of_service(yaml, i),
                None,
                format!("services[{i}] ({key}): {message}"),
            )
        })?;
        for (j, address) in addresses.into_iter().enumerate() {
            if let Some(other) = catalog.virtual_addresses.insert(address, key.clone()) {
                let message = if other == key {
                    format!("services[{i}].addresses[{j}]: {address} is listed twice")
                } else {
                    format!(
                        "services[{i}].addresses[{j}]: {address} is already the address of service {other}"
                    )
                };
                return Err(error(line_of_service(yaml, i), None, message));
            }
        }
        order.insert(key.clone(), i);
        catalog.services.insert(key, Arc::new(set));
    }
    // Endpoint addresses, first service by key wins; none may be a virtual address.
    for (key, set) in &catalog.services {
        for e in &set.endpoints {
            if let Some(owner) = catalog.virtual_addresses.get(&e.address) {
                return Err(error(
                    order.get(owner).and_then(|i| line_of_service(yaml, *i)),
                    None,
                    format!(
                        "service {owner}: address {} is also an endpoint of service {key}; a virtual address must be held by the service alone",
                        e.address
                    ),
                ));
            }
            catalog
                .endpoint_addresses
                .entry(e.address)
                .or_insert_with(|| key.clone());
        }
    }
    Ok(catalog)
}

/// serde_yaml_ng appends " at line L column C" to its messages; the error already says where.
fn without_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// The line of the `i`th entry of the top-level `services:` list, for checks that run after the
/// document is read (a best effort: the `- ` items at the list's indentation, in order).
fn line_of_service(yaml: &str, i: usize) -> Option<usize> {
    let mut lines = yaml
        .lines()
        .enumerate()
        .skip_while(|(_, l)| !l.starts_with("services:"));
    lines.next()?;
    let mut indent = None;
    let mut n = 0;
    for (number, line) in lines {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let this_indent = line.len() - trimmed.len();
        if !trimmed.starts_with("- ") && !trimmed.starts_with('-') {
            if this_indent == 0 {
                return None;
            }
            continue;
        }
        if *indent.get_or_insert(this_indent) != this_indent {
            continue;
        }
        if n == i {
            return Some(number + 1);
        }
        n += 1;
    }
    None
}

fn service_set(
    key: &ServiceKey,
    service: ServiceSpec,
    source: &SourceId,
    loaded_at: SystemTime,
) -> Result<EndpointSet, String> {
    let ports: Vec<ServicePort> = service
        .ports
        .iter()
        .map(|p| ServicePort {
            name: p.name.clone(),
            port: p.port.0,
            protocol: p.protocol.map(|p| p.0),
        })
        .collect();
    let mut numbers = HashSet::new();
    if let Some(dup) = ports.iter().find(|p| !numbers.insert(p.port)) {
        return Err(format!("port {} is listed twice", dup.port));
    }
    let service_protocol = match ports.as_slice() {
        [only] => only.protocol,
        _ => None,
    };
    let mut endpoints = Vec::with_capacity(service.endpoints.len());
    let mut addresses = HashSet::new();
    for (j, e) in service.endpoints.into_iter().enumerate() {
        let endpoint_ports: Vec<EndpointPort> = match e.ports {
            Some(ports) => ports
                .into_iter()
                .map(|p| EndpointPort {
                    name: p.name,
                    port: p.port.0,
                })
                .collect(),
            None if ports.is_empty() => {
                return Err(format!(
                    "endpoints[{j}] ({}): no `port`/`ports`, and the service has no ports to default to",
                    e.address
                ));
            }
            None => ports
                .iter()
                .map(|p| EndpointPort {
                    name: p.name.clone(),
                    port: p.port,
                })
                .collect(),
        };
        for p in &endpoint_ports {
            if !addresses.insert((e.address, p.port)) {
                return Err(format!(
                    "endpoints[{j}]: {}:{} is listed twice",
                    e.address, p.port
                ));
            }
        }
        endpoints.push(Endpoint {
            address: e.address,
            ports: endpoint_ports,
            readiness: e.readiness,
            identity: WorkloadIdentity::new(
                key.namespace.clone(),
                e.service_account.unwrap_or_else(|| key.name.clone()),
            ),
            owner: Some(match e.owner {
                Some(o) => OwnerRef {
                    kind: o.kind.0,
                    name: o.name.0,
                },
                None => OwnerRef {
                    kind: "Service".to_string(),
                    name: key.name.clone(),
                },
            }),
            labels: e.labels,
            weight: e.weight,
            zone: e.zone,
            protocol: e.protocol.map(|p| p.0).or(service_protocol),
            provenance: Provenance {
                source: source.clone(),
                confirmed_at: loaded_at,
            },
        });
    }
    Ok(EndpointSet {
        service: key.clone(),
        ports,
        endpoints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> SourceId {
        Arc::from("file:test")
    }

    fn parse_str(yaml: &str) -> Result<Catalog, ParseError> {
        parse(
            yaml,
            Path::new("mesh.yaml"),
            &source(),
            SystemTime::UNIX_EPOCH,
        )
    }

    fn error(yaml: &str) -> ParseError {
        parse_str(yaml).expect_err("the file is invalid")
    }

    const GOOD: &str = "\
namespace: shop
services:
  - name: web
    ports:
      - { name: http, port: 8080, protocol: http }
    endpoints:
      - address: 10.0.0.1
        port: 18080
        labels: { version: v1 }
      - address: 10.0.0.2
        ready: false
        service_account: web-canary
        weight: 5
        zone: z1
        owner: { kind: Deployment, name: web-canary }
  - name: db
    namespace: data
    endpoints:
      - address: 10.0.1.1
        ports: [{ name: pg, port: 5432 }]
        terminating: true
        protocol: tcp
";

    #[test]
    fn a_good_file_becomes_the_model_with_its_defaults() {
        let catalog = parse_str(GOOD).expect("valid");
        let keys: Vec<String> = catalog.services.keys().map(|k| k.to_string()).collect();
        assert_eq!(keys, vec!["data/db", "shop/web"]);

        let web = &catalog.services[&ServiceKey::new("shop", "web")];
        assert_eq!(web.service, ServiceKey::new("shop", "web"));
        assert_eq!(web.ports.len(), 1);
        assert_eq!(web.ports[0].protocol, Some(ProtocolHint::Http));
        let [first, second] = web.endpoints.as_slice() else {
            panic!("two endpoints: {web:?}")
        };
        assert_eq!(first.address.to_string(), "10.0.0.1");
        assert_eq!(
            first.ports,
            vec![EndpointPort {
                name: None,
                port: 18080
            }]
        );
        assert_eq!(first.readiness, Readiness::Ready);
        assert_eq!(first.identity, WorkloadIdentity::new("shop", "web"));
        assert_eq!(
            first.owner,
            Some(OwnerRef {
                kind: "Service".into(),
                name: "web".into()
            })
        );
        assert_eq!(first.labels.get("version").map(String::as_str), Some("v1"));
        assert_eq!(
            first.protocol,
            Some(ProtocolHint::Http),
            "from the service's only port"
        );
        assert_eq!(&*first.provenance.source, "file:test");
        // No port given: the service ports as they are.
        assert_eq!(
            second.ports,
            vec![EndpointPort {
                name: Some("http".into()),
                port: 8080
            }]
        );
        assert_eq!(second.readiness, Readiness::NotReady);
        assert_eq!(second.identity, WorkloadIdentity::new("shop", "web-canary"));
        assert_eq!(
            (second.weight, second.zone.as_deref()),
            (Some(5), Some("z1"))
        );
        assert_eq!(
            second.owner.as_ref().map(|o| o.name.as_str()),
            Some("web-canary")
        );

        let db = &catalog.services[&ServiceKey::new("data", "db")];
        assert_eq!(db.endpoints[0].readiness, Readiness::Terminating);
        assert_eq!(db.endpoints[0].protocol, Some(ProtocolHint::Tcp));
        assert_eq!(
            db.endpoints[0].identity,
            WorkloadIdentity::new("data", "db")
        );
    }

    #[test]
    fn the_demo_file_is_valid() {
        let catalog = parse_str(crate::DEMO_YAML).expect("demo.yaml is valid");
        let names: Vec<&str> = catalog.services.keys().map(|k| k.name.as_str()).collect();
        assert_eq!(names, vec!["api", "api-v1", "api-v2", "client", "web"]);
        assert!(catalog.services.keys().all(|k| k.namespace == "demo"));
    }

    #[test]
    fn invalid_yaml_is_reported_with_its_line() {
        let e = error("services:\n  - name: web\n    endpoints: [\n  - oops\n");
        assert_eq!(e.file, "mesh.yaml");
        assert!(e.line.is_some(), "{e}");
        assert!(e.to_string().starts_with("mesh.yaml:"), "{e}");
    }

    #[test]
    fn a_bad_address_names_its_line_and_field() {
        let yaml = GOOD.replace("10.0.0.2", "10.0.0.300");
        let e = error(&yaml);
        assert_eq!(e.line, Some(10), "{e}");
        assert!(e.message.contains("services[0].endpoints[1]"), "{e}");
        assert!(e.message.contains("invalid IP address"), "{e}");
        assert!(e.to_string().starts_with("mesh.yaml:10:"), "{e}");
    }

    #[test]
    fn an_unknown_field_is_an_error_not_ignored() {
        let yaml = GOOD.replace("        zone: z1", "        zoen: z1");
        let e = error(&yaml);
        assert_eq!(e.line, Some(14), "{e}");
        assert!(e.message.contains("unknown field `zoen`"), "{e}");
    }

    #[test]
    fn checks_on_values_carry_the_line() {
        let e = error(&GOOD.replace("port: 18080", "port: 70000"));
        assert_eq!(e.line, Some(8), "{e}");
        assert!(e.message.contains("port 70000 is not in 1..=65535"), "{e}");

        let e = error(&GOOD.replace("protocol: tcp", "protocol: htp"));
        assert_eq!(e.line, Some(22), "{e}");
        assert!(e.message.contains("unknown protocol \"htp\""), "{e}");

        let e = error(&GOOD.replace("port: 18080", "port: 18080\n        ports: [{ port: 1 }]"));
        assert!(
            e.message.contains("give `port` or `ports`, not both"),
            "{e}"
        );
        assert!(e.line.is_some_and(|l| (7..=10).contains(&l)), "{e}");

        let e = error(&GOOD.replace("  - name: db", "  - name: ''"));
        assert_eq!(e.line, Some(16), "{e}");
        assert!(e.message.contains("must not be empty"), "{e}");
    }

    #[test]
    fn a_duplicate_service_names_the_line_of_the_second() {
        let yaml =
            format!("{GOOD}  - name: web\n    endpoints: [{{ address: 10.0.0.9, port: 1 }}]\n");
        let e = error(&yaml);
        assert_eq!(e.line, Some(23), "{e}");
        assert!(
            e.message.contains("service shop/web is listed twice"),
            "{e}"
        );
    }

    #[test]
    fn an_endpoint_without_any_port_is_an_error() {
        let e =
            error("services:\n  - name: a\n  - name: b\n    endpoints: [{ address: 10.0.0.1 }]\n");
        assert_eq!(e.line, Some(3), "{e}");
        assert!(
            e.message.contains("services[1] (default/b): endpoints[0]"),
            "{e}"
        );
    }

    #[test]
    fn an_empty_file_is_an_error() {
        assert_eq!(error("  \n").message, "the file is empty");
        // ... but a file with no services is a valid, empty catalog.
        assert!(
            parse_str("services: []\n")
                .expect("valid")
                .services
                .is_empty()
        );
    }

    #[test]
    fn virtual_addresses_and_endpoint_addresses_name_their_service() {
        let yaml = "\
namespace: shop
services:
  - name: web
    addresses: [10.96.0.10, \"fd00::10\"]
    ports: [{ port: 80 }]
    endpoints: [{ address: 10.0.0.1, port: 8080, service_account: web-sa }]
";
        let catalog = parse_str(yaml).expect("valid");
        let web = ServiceKey::new("shop", "web");
        for ip in ["10.96.0.10", "fd00::10"] {
            match catalog.owner(ip.parse().unwrap()) {
                AddressOwner::Service { service, ports } => {
                    assert_eq!(service, web);
                    assert_eq!(ports[0].port, 80);
                }
                other => panic!("{ip}: {other:?}"),
            }
        }
        match catalog.owner("10.0.0.1".parse().unwrap()) {
            AddressOwner::Endpoint { service, endpoint } => {
                assert_eq!(service, web);
                assert_eq!(endpoint.identity.service_account, "web-sa");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            catalog.owner("10.0.0.2".parse().unwrap()),
            AddressOwner::Unknown
        );
    }

    #[test]
    fn bad_virtual_addresses_are_located_errors() {
        let e = error("services:\n  - name: a\n    addresses: [not-an-ip]\n");
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.message.contains("is not an IP address"), "{e}");

        let e = error("services:\n  - name: a\n    addresses: [0.0.0.0]\n");
        assert!(e.message.contains("cannot be a service address"), "{e}");

        let e = error(
            "services:\n  - name: a\n    addresses: [10.96.0.1]\n  - name: b\n    addresses: [10.96.0.1]\n",
        );
        assert_eq!(e.line, Some(4), "{e}");
        assert!(
            e.message
                .contains("10.96.0.1 is already the address of service default/a"),
            "{e}"
        );

        let e = error(
            "services:\n  - name: a\n    addresses: [10.0.0.1]\n  - name: b\n    endpoints: [{ address: 10.0.0.1, port: 80 }]\n",
        );
        assert_eq!(e.line, Some(2), "{e}");
        assert!(
            e.message.contains("also an endpoint of service default/b"),
            "{e}"
        );
    }
}
