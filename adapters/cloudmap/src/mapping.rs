//! Cloud Map instances to the endpoint model: attributes to address, port, identity, labels,
//! weight, zone and protocol; health status to readiness. Pure functions, unit-tested.
//!
//! | Cloud Map attribute | endpoint field |
//! |---|---|
//! | `AWS_INSTANCE_IPV4`, else `AWS_INSTANCE_IPV6` | `address` (an instance with neither is left out, with a warning) |
//! | `AWS_INSTANCE_PORT` | the one unnamed port (none when absent) |
//! | `SERVICE_ACCOUNT`, `service-account`, `service_account`, `serviceAccount` | identity service account (else the service name) |
//! | `version`, `VERSION` | label `version` (version subsets) |
//! | `weight`, `WEIGHT` | `weight` (a non-number is ignored, with a warning) |
//! | `protocol`, `PROTOCOL` | `protocol` ([`ProtocolHint::parse`]) |
//! | `AVAILABILITY_ZONE`, `AWS_INSTANCE_AVAILABILITY_ZONE`, `zone` | `zone` |
//! | `ECS_SERVICE_NAME` | owner `EcsService/<name>` (else `Service/<service>`) |
//! | every attribute | `labels`, verbatim |
//!
//! Health: `HEALTHY` -> `Ready`, `UNHEALTHY` -> `NotReady`, `UNKNOWN` or absent -> `Ready`. Cloud
//! Map reports `UNKNOWN` while a first health check is pending and for services without health
//! checks; treating it as not ready would send no traffic to every service that has no checks.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::SystemTime;

use trellis_discovery::{
    Endpoint, EndpointPort, EndpointSet, OwnerRef, ProtocolHint, Provenance, Readiness, ServiceKey,
    ServicePort, Snapshot, SourceId, VERSION_LABEL, WorkloadIdentity,
};

pub const ATTR_IPV4: &str = "AWS_INSTANCE_IPV4";
pub const ATTR_IPV6: &str = "AWS_INSTANCE_IPV6";
pub const ATTR_PORT: &str = "AWS_INSTANCE_PORT";
/// Accepted spellings of the explicit service-account attribute, first match wins.
pub const ATTR_SERVICE_ACCOUNT: &[&str] = &[
    "SERVICE_ACCOUNT",
    "service-account",
    "service_account",
    "serviceAccount",
];
pub const ATTR_VERSION: &[&str] = &["version", "VERSION"];
pub const ATTR_WEIGHT: &[&str] = &["weight", "WEIGHT"];
pub const ATTR_PROTOCOL: &[&str] = &["protocol", "PROTOCOL"];
pub const ATTR_ZONE: &[&str] = &[
    "AVAILABILITY_ZONE",
    "AWS_INSTANCE_AVAILABILITY_ZONE",
    "zone",
];
pub const ATTR_ECS_SERVICE: &str = "ECS_SERVICE_NAME";

/// Cloud Map's health status of one instance, as DiscoverInstances reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Health {
    Healthy,
    Unhealthy,
    /// `UNKNOWN`, absent, or a value this SDK version does not know.
    Unknown,
}

impl Health {
    pub fn readiness(self) -> Readiness {
        match self {
            Health::Healthy | Health::Unknown => Readiness::Ready,
            Health::Unhealthy => Readiness::NotReady,
        }
    }
}

/// One instance as DiscoverInstances returned it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RawInstance {
    pub id: String,
    pub health: Health,
    pub attributes: BTreeMap<String, String>,
}

/// Makes instance ids unique, keeping the **last** entry of an id. Real Cloud Map replaces an
/// instance re-registered with the same id; moto appends a second copy instead, and the later one
/// is the newer registration. Sorted by id, so that equal memberships compare equal.
pub fn dedupe(instances: Vec<RawInstance>) -> Vec<RawInstance> {
    let mut by_id: BTreeMap<String, RawInstance> = BTreeMap::new();
    for instance in instances {
        by_id.insert(instance.id.clone(), instance);
    }
    by_id.into_values().collect()
}

fn first<'a>(attributes: &'a BTreeMap<String, String>, keys: &[&str]) -> Option<&'a str> {
    keys.iter()
        .find_map(|k| attributes.get(*k))
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
}

/// The endpoint for `instance` of `key`, or why it cannot be one.
pub fn endpoint(
    key: &ServiceKey,
    instance: &RawInstance,
    provenance: &Provenance,
) -> Result<Endpoint, String> {
    let attrs = &instance.attributes;
    let address: IpAddr = match (attrs.get(ATTR_IPV4), attrs.get(ATTR_IPV6)) {
        (Some(v4), _) => v4
            .trim()
            .parse()
            .map_err(|_| format!("{ATTR_IPV4} {v4:?} is not an IP address"))?,
        (None, Some(v6)) => v6
            .trim()
            .parse()
            .map_err(|_| format!("{ATTR_IPV6} {v6:?} is not an IP address"))?,
        (None, None) => return Err(format!("no {ATTR_IPV4} or {ATTR_IPV6} attribute")),
    };
    let ports = match attrs.get(ATTR_PORT) {
        Some(p) => vec![EndpointPort {
            name: None,
            port: p
                .trim()
                .parse()
                .map_err(|_| format!("{ATTR_PORT} {p:?} is not a port number"))?,
        }],
        None => Vec::new(),
    };
    let service_account = first(attrs, ATTR_SERVICE_ACCOUNT).unwrap_or(&key.name);
    let weight = first(attrs, ATTR_WEIGHT).and_then(|w| match w.parse::<u32>() {
        Ok(w) => Some(w),
        Err(_) => {
            tracing::warn!(service = %key, instance = %instance.id, weight = w, "ignoring a weight attribute that is not a whole number");
            None
        }
    });
    let mut labels = attrs.clone();
    if let Some(version) = first(attrs, ATTR_VERSION) {
        labels.insert(VERSION_LABEL.to_string(), version.to_string());
    }
    let owner = match attrs.get(ATTR_ECS_SERVICE) {
        Some(ecs) => OwnerRef {
            kind: "EcsService".to_string(),
            name: ecs.clone(),
        },
        None => OwnerRef {
            kind: "Service".to_string(),
            name: key.name.clone(),
        },
    };
    Ok(Endpoint {
        address,
        ports,
        readiness: instance.health.readiness(),
        identity: WorkloadIdentity::new(key.namespace.clone(), service_account),
        owner: Some(owner),
        labels,
        weight,
        zone: first(attrs, ATTR_ZONE).map(str::to_string),
        protocol: first(attrs, ATTR_PROTOCOL).and_then(ProtocolHint::parse),
        provenance: provenance.clone(),
    })
}

/// The whole endpoint set of `key` from its (deduplicated) instances. Instances that cannot be
/// endpoints are left out with a warning. Service ports: each distinct instance port, with the
/// protocol when every instance on that port agrees on one.
pub fn endpoint_set(
    key: &ServiceKey,
    instances: &[RawInstance],
    source: &SourceId,
    confirmed_at: SystemTime,
) -> EndpointSet {
    let provenance = Provenance {
        source: source.clone(),
        confirmed_at,
    };
    let endpoints: Vec<Endpoint> = instances
        .iter()
        .filter_map(|i| match endpoint(key, i, &provenance) {
            Ok(e) => Some(e),
            Err(why) => {
                tracing::warn!(service = %key, instance = %i.id, "leaving out a Cloud Map instance: {why}");
                None
            }
        })
        .collect();
    let mut protocols: BTreeMap<u16, Vec<Option<ProtocolHint>>> = BTreeMap::new();
    for e in &endpoints {
        for p in &e.ports {
            let hints = protocols.entry(p.port).or_default();
            if !hints.contains(&e.protocol) {
                hints.push(e.protocol);
            }
        }
    }
    let ports = protocols
        .into_iter()
        .map(|(port, hints)| ServicePort {
            name: None,
            port,
            protocol: match hints.len() {
                1 => hints.into_iter().next().flatten(),
                _ => None,
            },
        })
        .collect();
    EndpointSet {
        service: key.clone(),
        ports,
        endpoints,
    }
}

/// What a watch last saw: the service missing, or its instances.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    NotFound,
    Instances(Vec<RawInstance>),
}

/// A digest of what a watch saw, kept instead of the instances themselves so a watch holds one
/// copy of a service (the snapshot it yielded), not two. SipHash over the sorted instances: a
/// collision (2^-64) would only delay one change until the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fingerprint {
    NotFound,
    Instances(u64),
}

impl Seen {
    pub fn fingerprint(&self) -> Fingerprint {
        use std::hash::{Hash, Hasher};
        match self {
            Seen::NotFound => Fingerprint::NotFound,
            Seen::Instances(instances) => {
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                instances.hash(&mut hasher);
                Fingerprint::Instances(hasher.finish())
            }
        }
    }

    pub fn snapshot(&self, key: &ServiceKey, source: &SourceId, at: SystemTime) -> Snapshot {
        match self {
            Seen::NotFound => Snapshot::NotFound,
            Seen::Instances(instances) => {
                Snapshot::Endpoints(endpoint_set(key, instances, source, at))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str, health: Health, attrs: &[(&str, &str)]) -> RawInstance {
        RawInstance {
            id: id.to_string(),
            health,
            attributes: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn key() -> ServiceKey {
        ServiceKey::new("prod.local", "web")
    }

    fn provenance() -> Provenance {
        Provenance {
            source: "cloudmap:test".into(),
            confirmed_at: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn every_known_attribute_maps_to_its_field_and_all_are_labels() {
        let i = instance(
            "i-1",
            Health::Healthy,
            &[
                ("AWS_INSTANCE_IPV4", "10.1.2.3"),
                ("AWS_INSTANCE_PORT", "8443"),
                ("SERVICE_ACCOUNT", "web-sa"),
                ("VERSION", "v2"),
                ("weight", "25"),
                ("protocol", "grpc"),
                ("AVAILABILITY_ZONE", "us-east-1a"),
                ("ECS_SERVICE_NAME", "web-canary"),
                ("team", "payments"),
            ],
        );
        let e = endpoint(&key(), &i, &provenance()).unwrap();
        assert_eq!(e.address, "10.1.2.3".parse::<IpAddr>().unwrap());
        assert_eq!(
            e.ports,
            vec![EndpointPort {
                name: None,
                port: 8443
            }]
        );
        assert_eq!(e.readiness, Readiness::Ready);
        assert_eq!(e.identity, WorkloadIdentity::new("prod.local", "web-sa"));
        assert_eq!(e.labels.get(VERSION_LABEL).map(String::as_str), Some("v2"));
        assert_eq!(e.labels.get("VERSION").map(String::as_str), Some("v2"));
        assert_eq!(e.labels.get("team").map(String::as_str), Some("payments"));
        assert_eq!(
            e.labels.get("AWS_INSTANCE_IPV4").map(String::as_str),
            Some("10.1.2.3")
        );
        assert_eq!(e.weight, Some(25));
        assert_eq!(e.protocol, Some(ProtocolHint::Grpc));
        assert_eq!(e.zone.as_deref(), Some("us-east-1a"));
        assert_eq!(
            e.owner,
            Some(OwnerRef {
                kind: "EcsService".into(),
                name: "web-canary".into()
            })
        );
        assert_eq!(e.provenance, provenance());
    }

    #[test]
    fn identity_defaults_to_the_service_name_and_other_spellings_work() {
        let plain = instance("i-1", Health::Healthy, &[("AWS_INSTANCE_IPV4", "10.0.0.1")]);
        let e = endpoint(&key(), &plain, &provenance()).unwrap();
        assert_eq!(e.identity, WorkloadIdentity::new("prod.local", "web"));
        assert_eq!(
            e.owner,
            Some(OwnerRef {
                kind: "Service".into(),
                name: "web".into()
            })
        );
        assert!(e.ports.is_empty(), "no AWS_INSTANCE_PORT, no port");

        let dashed = instance(
            "i-2",
            Health::Healthy,
            &[
                ("AWS_INSTANCE_IPV4", "10.0.0.2"),
                ("service-account", "billing"),
                ("zone", "z1"),
            ],
        );
        let e = endpoint(&key(), &dashed, &provenance()).unwrap();
        assert_eq!(e.identity.service_account, "billing");
        assert_eq!(e.zone.as_deref(), Some("z1"));
    }

    #[test]
    fn ipv6_is_used_when_there_is_no_ipv4() {
        let i = instance("i-1", Health::Healthy, &[("AWS_INSTANCE_IPV6", "fd00::7")]);
        let e = endpoint(&key(), &i, &provenance()).unwrap();
        assert_eq!(e.address, "fd00::7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn instances_that_cannot_be_endpoints_are_left_out_with_the_reason() {
        let no_ip = instance(
            "a",
            Health::Healthy,
            &[("AWS_INSTANCE_CNAME", "web.example")],
        );
        let bad_ip = instance("b", Health::Healthy, &[("AWS_INSTANCE_IPV4", "10.0.0")]);
        let bad_port = instance(
            "c",
            Health::Healthy,
            &[
                ("AWS_INSTANCE_IPV4", "10.0.0.3"),
                ("AWS_INSTANCE_PORT", "http"),
            ],
        );
        let good = instance("d", Health::Healthy, &[("AWS_INSTANCE_IPV4", "10.0.0.4")]);
        let err = endpoint(&key(), &no_ip, &provenance()).unwrap_err();
        assert!(err.contains("AWS_INSTANCE_IPV4"), "{err}");
        let err = endpoint(&key(), &bad_ip, &provenance()).unwrap_err();
        assert!(err.contains("\"10.0.0\""), "{err}");
        let err = endpoint(&key(), &bad_port, &provenance()).unwrap_err();
        assert!(err.contains("AWS_INSTANCE_PORT"), "{err}");
        let set = endpoint_set(
            &key(),
            &[no_ip, bad_ip, bad_port, good],
            &"cloudmap:test".into(),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(set.endpoints.len(), 1);
        assert_eq!(
            set.endpoints[0].address,
            "10.0.0.4".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn a_weight_that_is_not_a_number_is_ignored() {
        let i = instance(
            "i-1",
            Health::Healthy,
            &[("AWS_INSTANCE_IPV4", "10.0.0.1"), ("WEIGHT", "heavy")],
        );
        assert_eq!(endpoint(&key(), &i, &provenance()).unwrap().weight, None);
    }

    #[test]
    fn health_maps_to_readiness_with_unknown_as_ready() {
        assert_eq!(Health::Healthy.readiness(), Readiness::Ready);
        assert_eq!(Health::Unhealthy.readiness(), Readiness::NotReady);
        assert_eq!(Health::Unknown.readiness(), Readiness::Ready);
        let down = instance(
            "i-1",
            Health::Unhealthy,
            &[("AWS_INSTANCE_IPV4", "10.0.0.1")],
        );
        assert_eq!(
            endpoint(&key(), &down, &provenance()).unwrap().readiness,
            Readiness::NotReady,
            "an unhealthy instance stays in the set as NotReady"
        );
    }

    #[test]
    fn duplicate_instance_ids_keep_the_last_registration() {
        let first = instance("i-1", Health::Healthy, &[("AWS_INSTANCE_IPV4", "10.0.0.1")]);
        let second = instance("i-1", Health::Healthy, &[("AWS_INSTANCE_IPV4", "10.0.0.2")]);
        let other = instance("i-0", Health::Healthy, &[("AWS_INSTANCE_IPV4", "10.0.0.9")]);
        let unique = dedupe(vec![first, other.clone(), second.clone()]);
        assert_eq!(
            unique,
            vec![other, second],
            "one per id, sorted by id, last wins"
        );
    }

    #[test]
    fn service_ports_are_the_distinct_instance_ports_with_an_agreed_protocol() {
        let at = |id: &str, ip: &str, port: &str, proto: &str| {
            instance(
                id,
                Health::Healthy,
                &[
                    ("AWS_INSTANCE_IPV4", ip),
                    ("AWS_INSTANCE_PORT", port),
                    ("protocol", proto),
                ],
            )
        };
        let set = endpoint_set(
            &key(),
            &[
                at("a", "10.0.0.1", "8080", "http"),
                at("b", "10.0.0.2", "8080", "http"),
                at("c", "10.0.0.3", "9090", "grpc"),
                at("d", "10.0.0.4", "9090", "tcp"),
            ],
            &"cloudmap:test".into(),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(
            set.ports,
            vec![
                ServicePort {
                    name: None,
                    port: 8080,
                    protocol: Some(ProtocolHint::Http)
                },
                ServicePort {
                    name: None,
                    port: 9090,
                    protocol: None
                },
            ]
        );
    }

    #[test]
    fn fingerprints_differ_exactly_when_the_instances_do() {
        let a = || {
            vec![instance(
                "a",
                Health::Healthy,
                &[("AWS_INSTANCE_IPV4", "10.0.0.1")],
            )]
        };
        assert_eq!(
            Seen::Instances(a()).fingerprint(),
            Seen::Instances(a()).fingerprint()
        );
        let mut down = a();
        down[0].health = Health::Unhealthy;
        assert_ne!(
            Seen::Instances(a()).fingerprint(),
            Seen::Instances(down).fingerprint()
        );
        assert_ne!(
            Seen::Instances(Vec::new()).fingerprint(),
            Seen::NotFound.fingerprint()
        );
    }
}
