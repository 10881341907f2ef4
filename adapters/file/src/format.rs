//! The file format (YAML) and its translation into the endpoint model.
//!
//! ```yaml
//! namespace: demo                 # default namespace of every service (default: "default")
//! services:
//!   - name: web                   # required; `namespace:` here overrides the default
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
    Endpoint, EndpointPort, EndpointSet, OwnerRef, ProtocolHint, Provenance, Readiness, ServiceKey,
    ServicePort, SourceId, WorkloadIdentity,
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
#[derive(Debug, Deserialize)]
#[serde(try_from = "String")]
struct NonEmpty(String);

impl TryFrom<String> for NonEmpty {
    type Error = &'static str;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        if s.trim().is_empty() {
            Err("must not be empty")
        } else {
            Ok(Self(s))
        }
    }
}

/// A port number 1..=65535.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(try_from = "u32")]
struct PortNumber(u16);

impl TryFrom<u32> for PortNumber {
    type Error = String;

    fn try_from(n: u32) -> Result<Self, String> {
        match u16::try_from(n) {
            Ok(p) if p != 0 => Ok(Self(p)),
            _ => Err(format!("port {n} is not in 1..=65535")),
        }
    }
}

/// A protocol hint, spelled as [`ProtocolHint::parse`] accepts; anything else is an error here (a
/// file is written by a person, who wants to know about a typo).
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(try_from = "String")]
struct Protocol(ProtocolHint);

impl TryFrom<String> for Protocol {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        ProtocolHint::parse(&s)
            .map(Protocol)
            .ok_or_else(|| format!("unknown protocol {s:?}: use http, http2, grpc or tcp"))
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
        let set = service_set(&key, service, source, loaded_at).map_err(|message| {
            error(
                line_of_service(yaml, i),
                None,
                format!("services[{i}] ({key}): {message}"),
            )
        })?;
        catalog.services.insert(key, Arc::new(set));
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
