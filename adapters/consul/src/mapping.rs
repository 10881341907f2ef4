//! Consul instances to the endpoint model: readiness from checks, labels from tags and meta,
//! identity, weight, zone and protocol.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::SystemTime;

use trellis_discovery::{
    Endpoint, EndpointPort, EndpointSet, OwnerRef, ProtocolHint, Provenance, Readiness, ServiceKey,
    ServicePort, SourceId, WorkloadIdentity,
};

use crate::config::{ConsulConfig, WarningPolicy};
use crate::wire::{Check, HealthEntry};

/// The check Consul adds to a service in maintenance mode (`consul maint -service`), critical.
const SERVICE_MAINTENANCE_PREFIX: &str = "_service_maintenance:";
/// The check Consul adds to a node in maintenance mode, critical.
const NODE_MAINTENANCE: &str = "_node_maintenance";

/// The prefix of labels made from bare tags: tag `primary` -> label `tag.primary` = "".
pub const BARE_TAG_PREFIX: &str = "tag.";

/// An instance's readiness from all its checks (node checks included, as Consul's `passing`
/// filter does), and whether its worst check is `warning`.
pub(crate) fn readiness(checks: &[Check], warning: WarningPolicy) -> (Readiness, bool) {
    let maintenance = checks.iter().any(|c| {
        c.status == "maintenance"
            || (c.status == "critical"
                && (c.check_id.starts_with(SERVICE_MAINTENANCE_PREFIX)
                    || c.check_id == NODE_MAINTENANCE))
    });
    if maintenance {
        return (Readiness::Terminating, false);
    }
    if checks.iter().any(|c| c.status == "critical") {
        return (Readiness::NotReady, false);
    }
    if checks.iter().any(|c| c.status == "warning") {
        let r = match warning {
            WarningPolicy::Ready => Readiness::Ready,
            WarningPolicy::NotReady => Readiness::NotReady,
        };
        return (r, true);
    }
    // No checks at all counts as passing, as in Consul.
    (Readiness::Ready, false)
}

/// Tags and meta to labels: a `k=v` tag gives `k` = `v`, a bare tag `t` gives `tag.t` = "", meta
/// `k: v` gives `k` = `v`. Meta is applied last, so it wins over a tag with the same key.
pub(crate) fn labels(tags: &[String], meta: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    for tag in tags {
        match tag.split_once('=') {
            Some((k, v)) if !k.is_empty() => labels.insert(k.to_owned(), v.to_owned()),
            _ => labels.insert(format!("{BARE_TAG_PREFIX}{tag}"), String::new()),
        };
    }
    for (k, v) in meta {
        labels.insert(k.clone(), v.clone());
    }
    labels
}

/// One instance as an endpoint; `None` when neither the service nor the node address is an IP
/// (Consul allows hostnames; the mesh needs addresses), which the caller logs.
pub(crate) fn endpoint(
    entry: &HealthEntry,
    key: &ServiceKey,
    config: &ConsulConfig,
    provenance: &Provenance,
) -> Option<Endpoint> {
    let svc = &entry.service;
    // Consul: an empty Service.Address means "use the node's address".
    let address: IpAddr = [&svc.address, &entry.node.address]
        .into_iter()
        .find(|a| !a.is_empty())
        .and_then(|a| a.parse().ok())?;
    let checks: Vec<Check> = entry
        .checks
        .iter()
        .filter(|c| c.service_id.is_empty() || c.service_id == svc.id)
        .cloned()
        .collect();
    let (readiness, in_warning) = readiness(&checks, config.warning);
    let labels = labels(&svc.tags, &svc.meta);
    let service_account = labels
        .get(&config.service_account_key)
        .filter(|v| !v.is_empty())
        .cloned()
        .unwrap_or_else(|| svc.service.clone());
    let zone = labels
        .get(&config.zone_key)
        .or_else(|| entry.node.meta.get(&config.zone_key))
        .filter(|v| !v.is_empty())
        .cloned();
    let protocol = labels
        .get(&config.protocol_key)
        .and_then(|p| ProtocolHint::parse(p));
    // Consul defaults Weights to {Passing: 1, Warning: 1} on registration.
    let weight = svc
        .weights
        .map(|w| if in_warning { w.warning } else { w.passing });
    Some(Endpoint {
        address,
        ports: vec![EndpointPort {
            name: None,
            port: svc.port,
        }],
        readiness,
        identity: WorkloadIdentity::new(key.namespace.clone(), service_account),
        owner: Some(OwnerRef {
            kind: "Service".to_owned(),
            name: svc.service.clone(),
        }),
        labels,
        weight,
        zone,
        protocol,
        provenance: provenance.clone(),
    })
}

/// The whole set: endpoints sorted by address and port; service ports are the distinct instance
/// ports (Consul has no service-level port), each with the protocol its instances declare.
pub(crate) fn endpoint_set(
    entries: &[HealthEntry],
    key: &ServiceKey,
    config: &ConsulConfig,
    source: &SourceId,
) -> EndpointSet {
    let provenance = Provenance {
        source: source.clone(),
        confirmed_at: SystemTime::now(),
    };
    let mut endpoints = Vec::with_capacity(entries.len());
    for entry in entries {
        match endpoint(entry, key, config, &provenance) {
            Some(e) => endpoints.push(e),
            None => tracing::warn!(
                service = %key,
                instance = %entry.service.id,
                node = %entry.node.node,
                "skipping a Consul instance whose service and node addresses are not IP addresses"
            ),
        }
    }
    endpoints.sort_by_key(|e| (e.address, e.ports[0].port));
    let mut ports: BTreeMap<u16, Option<ProtocolHint>> = BTreeMap::new();
    for e in &endpoints {
        let slot = ports.entry(e.ports[0].port).or_default();
        if slot.is_none() {
            *slot = e.protocol;
        }
    }
    EndpointSet {
        service: key.clone(),
        ports: ports
            .into_iter()
            .map(|(port, protocol)| ServicePort {
                name: None,
                port,
                protocol,
            })
            .collect(),
        endpoints,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Node, Service, Weights};

    fn check(id: &str, status: &str, service_id: &str) -> Check {
        Check {
            check_id: id.into(),
            status: status.into(),
            service_id: service_id.into(),
        }
    }

    fn entry(tags: &[&str], meta: &[(&str, &str)], checks: Vec<Check>) -> HealthEntry {
        HealthEntry {
            node: Node {
                node: "n1".into(),
                address: "10.0.0.9".into(),
                meta: [("zone".to_string(), "node-zone".to_string())].into(),
            },
            service: Service {
                id: "web-1".into(),
                service: "web".into(),
                tags: tags.iter().map(|t| t.to_string()).collect(),
                address: String::new(),
                meta: meta
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                port: 8080,
                weights: Some(Weights {
                    passing: 10,
                    warning: 2,
                }),
            },
            checks,
        }
    }

    fn map(e: &HealthEntry, config: &ConsulConfig) -> Endpoint {
        let key = ServiceKey::new("default", "web");
        let p = Provenance {
            source: "consul:test".into(),
            confirmed_at: SystemTime::UNIX_EPOCH,
        };
        endpoint(e, &key, config, &p).unwrap()
    }

    #[test]
    fn check_status_maps_to_readiness() {
        let w = WarningPolicy::Ready;
        assert_eq!(readiness(&[], w), (Readiness::Ready, false));
        assert_eq!(
            readiness(
                &[
                    check("serfHealth", "passing", ""),
                    check("c", "warning", "web-1")
                ],
                w
            ),
            (Readiness::Ready, true)
        );
        assert_eq!(
            readiness(&[check("c", "warning", "web-1")], WarningPolicy::NotReady).0,
            Readiness::NotReady
        );
        assert_eq!(
            readiness(&[check("serfHealth", "critical", "")], w).0,
            Readiness::NotReady
        );
        let maint = check("_service_maintenance:web-1", "critical", "web-1");
        assert_eq!(readiness(&[maint], w).0, Readiness::Terminating);
        assert_eq!(
            readiness(&[check("_node_maintenance", "critical", "")], w).0,
            Readiness::Terminating
        );
    }

    #[test]
    fn tags_and_meta_become_labels_with_meta_winning() {
        let meta: BTreeMap<String, String> = [
            ("version".to_string(), "v3".to_string()),
            ("team".to_string(), "a".to_string()),
        ]
        .into();
        let l = labels(&["version=v2".into(), "primary".into(), "k=".into()], &meta);
        assert_eq!(l["version"], "v3");
        assert_eq!(l["tag.primary"], "");
        assert_eq!(l["k"], "");
        assert_eq!(l["team"], "a");
    }

    #[test]
    fn identity_zone_weight_and_address_fallback() {
        let config = ConsulConfig::new("127.0.0.1:8500");
        let plain = map(&entry(&[], &[], vec![]), &config);
        assert_eq!(
            plain.address.to_string(),
            "10.0.0.9",
            "node address fallback"
        );
        assert_eq!(plain.identity, WorkloadIdentity::new("default", "web"));
        assert_eq!(plain.zone.as_deref(), Some("node-zone"));
        assert_eq!(plain.weight, Some(10));

        let explicit = entry(
            &["service-account=from-tag", "protocol=grpc"],
            &[("service-account", "web-sa"), ("zone", "z1")],
            vec![check("c", "warning", "web-1")],
        );
        let e = map(&explicit, &config);
        assert_eq!(
            e.identity.service_account, "web-sa",
            "meta wins over the tag"
        );
        assert_eq!(e.zone.as_deref(), Some("z1"));
        assert_eq!(e.weight, Some(2), "Weights.Warning while a check warns");
        assert_eq!(e.protocol, Some(ProtocolHint::Grpc));
    }

    #[test]
    fn another_instances_checks_on_the_same_node_do_not_count() {
        let config = ConsulConfig::new("127.0.0.1:8500");
        let e = map(
            &entry(&[], &[], vec![check("other", "critical", "web-2")]),
            &config,
        );
        assert_eq!(e.readiness, Readiness::Ready);
    }
}
