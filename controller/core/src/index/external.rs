//! Destinations outside the mesh: what `Destinations.Watch("host:port")` answers for a host an
//! ExternalService declares, and the mesh-wide ports proxies read names on.
//!
//! Rules (Trellis's decisions; the ExternalService kind is documented in
//! `trellis_smi::api::external`):
//! - A host the mesh reads as one of its own service names (one or two labels after
//!   [`normalize`], or a name normalization rewrites: `*.svc.<domain>`, `*.consul`) is never
//!   served as external: the gRPC API asks for the mesh service, so the mesh service wins. Such
//!   a host is reported at the ExternalService and left out ([`is_mesh_name`]).
//! - A declared host is answered, whatever the port asked (the proxy keys named destinations by
//!   their host, as it does mesh services), with ONE profile: `authority` = the host, protocol
//!   HTTP when every declared port is `http`, TCP when none is, else detect (HTTP on the `http`
//!   ports, the application's own TLS passed through on the `tls` ports); one backend named after
//!   the ExternalService whose endpoints carry no port: the host (the proxy resolves it when it
//!   connects) or the spec's fixed `addresses`; no identity, the server is no mesh workload;
//!   `workload` = `{kind: externalservice, name, namespace}` for metric labels; `external` = the
//!   SPIFFE ids of the sources (as TrafficTarget sources: the namespace defaults to the
//!   ExternalService's), every declared port (with the port TLS is originated to for an
//!   `originateTls` port) and the spec's `caBundle`. The proxy connects to the port called (or
//!   the origination port) and refuses an undeclared port itself.
//! - Two ExternalServices declaring one host (on any ports): both are reported, and the answer
//!   denies every caller (a profile with no allowed identity) until one of them is removed:
//!   neither team's sources are trusted over the other's, and under `--egress allow` a "not
//!   found" would let every workload through unchecked, so refusing is the fail-safe answer.
//! - An undeclared host: `NotFound` (forwarded unchanged, or refused under
//!   `--egress deny`).
//! - [`external_ports`]: the ports of `tls` and `http` ports, mesh-wide, sorted, once each. A
//!   proxy reads the SNI or Host of a transparent connection to an unknown address on one of
//!   them and asks again by name. `tcp` ports are left out: opaque bytes carry no name, and
//!   waiting for one would stall server-first protocols (SMTP, MySQL) for the read timeout.
//!
//! - A transparent connection to one of an ExternalService's fixed `addresses` on one of its
//!   ports (the only way a `tcp` port is recognized without a proxy upstream naming it) that
//!   discovery does not place in the mesh (the mesh wins again: `super::address` asks here only
//!   for addresses no service or endpoint holds) gets the profile of the ExternalService's first
//!   host on that port, with the address as `authority` ([`resolve_address`]). An address:port two
//!   ExternalServices list is answered like a conflicting `host:port` (reported, deny-all).
//!
//! These answers read only the policy, never discovery, so every open external channel is
//! recomputed on every policy change (a map lookup each; channels send only on a real change).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use trellis_discovery::WorkloadIdentity;
use trellis_proxy_api::authority::normalize;
use trellis_proxy_api::v1;
use trellis_smi::model::{
    ExternalPort, ExternalProtocol, ExternalService, Kind, ResourceId, effective_namespace,
};

use super::policy::PolicyView;

/// The kind name in `WorkloadRef` (metric labels) of an external destination.
pub const WORKLOAD_KIND: &str = "externalservice";

/// Whether the mesh reads `host` as one of its own service names (see the module docs).
pub fn is_mesh_name(host: &str) -> bool {
    match normalize(host) {
        Ok(authority) => {
            authority.is_ip || authority.name != host || authority.name.split('.').count() <= 2
        }
        // Not a name the mesh can be asked about at all; validation reports it.
        Err(_) => true,
    }
}

/// The id of an ExternalService (how origins are keyed).
pub(crate) fn external_rid(external: &ExternalService) -> ResourceId {
    ResourceId::new(Kind::ExternalService.as_str(), &external.metadata)
}

/// `namespace/name` of an ExternalService.
pub(crate) fn external_name(external: &ExternalService) -> String {
    format!(
        "{}/{}",
        effective_namespace(&external.metadata),
        external.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The ports [`v1::NotFound::external_ports`] carries for `view` (see the module docs).
pub fn external_ports(view: &PolicyView) -> Vec<u32> {
    let ports: BTreeSet<u32> = view
        .externals
        .iter()
        .filter(|((_, _), declared)| {
            declared
                .iter()
                .any(|(_, port)| port.protocol != ExternalProtocol::Tcp)
        })
        .map(|((_, port), _)| u32::from(*port))
        .collect();
    ports.into_iter().collect()
}

/// What an external channel answers for: a name, or a fixed address (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ExternalKey {
    /// A host, normalized (lower case, no trailing dot).
    Host(String),
    /// An address discovery does not place in the mesh.
    Address(SocketAddr),
}

impl std::fmt::Display for ExternalKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExternalKey::Host(host) => f.write_str(host),
            ExternalKey::Address(addr) => addr.fmt(f),
        }
    }
}

/// The answer for `key`.
pub fn resolve_key(
    view: &PolicyView,
    key: &ExternalKey,
    trust_domain: &str,
) -> v1::destination_update::Kind {
    match key {
        ExternalKey::Host(host) => resolve(view, host, trust_domain),
        ExternalKey::Address(addr) => resolve_address(view, *addr, trust_domain),
    }
}

/// The answer for a fixed address (see the module docs).
pub fn resolve_address(
    view: &PolicyView,
    addr: SocketAddr,
    trust_domain: &str,
) -> v1::destination_update::Kind {
    let Some(listed) = view.external_addresses.get(&addr) else {
        return v1::destination_update::Kind::NotFound(v1::NotFound {
            reason: format!(
                "{addr} is no service's or endpoint's address in the mesh and no ExternalService lists it: forwarded unchanged"
            ),
            egress_denied: false,
            external_ports: Vec::new(),
        });
    };
    let (host, port, first) = &listed[0];
    let mut kind = resolve(view, host, trust_domain);
    if let v1::destination_update::Kind::Profile(profile) = &mut kind {
        profile.authority = addr.to_string();
        // An address is one port of the host: that port's protocol, not the host's mix.
        let http = view
            .externals
            .get(&(host.clone(), *port))
            .is_some_and(|declared| {
                declared.iter().any(|(e, p)| {
                    std::sync::Arc::ptr_eq(e, first) && p.protocol == ExternalProtocol::Http
                })
            });
        profile.protocol = if http {
            v1::Protocol::Http
        } else {
            v1::Protocol::Tcp
        } as i32;
        let conflict = listed
            .iter()
            .any(|(_, _, other)| !std::sync::Arc::ptr_eq(other, first));
        if conflict && let Some(section) = profile.external.as_mut() {
            section.allowed_identities.clear();
        }
    }
    kind
}

/// The answer for `host` (normalized: lower case, no trailing dot): every port declared for it.
pub fn resolve(view: &PolicyView, host: &str, trust_domain: &str) -> v1::destination_update::Kind {
    let declared: Vec<&(std::sync::Arc<ExternalService>, ExternalPort)> = view
        .externals
        .iter()
        .filter(|((h, _), _)| h == host)
        .flat_map(|(_, declared)| declared.iter())
        .collect();
    let Some((first, _)) = declared.first() else {
        return v1::destination_update::Kind::NotFound(v1::NotFound {
            reason: format!("{host} is no mesh service and no ExternalService declares it"),
            egress_denied: false,
            external_ports: Vec::new(),
        });
    };
    let ports: Vec<&ExternalPort> = declared
        .iter()
        .filter(|(e, _)| std::sync::Arc::ptr_eq(e, first))
        .map(|(_, port)| port)
        .collect();
    let mut profile = profile(host, &ports, first, trust_domain);
    let conflict = declared
        .iter()
        .any(|(e, _)| !std::sync::Arc::ptr_eq(e, first));
    if conflict && let Some(section) = profile.external.as_mut() {
        // Conflicting declarations: nobody may call it until one is removed (module docs).
        section.allowed_identities.clear();
    }
    v1::destination_update::Kind::Profile(profile)
}

/// The profile of `host` as `external` declares it on `ports`.
fn profile(
    host: &str,
    ports: &[&ExternalPort],
    external: &ExternalService,
    trust_domain: &str,
) -> v1::DestinationProfile {
    let namespace = effective_namespace(&external.metadata);
    let name = external.metadata.name.clone().unwrap_or_default();
    let http = ports
        .iter()
        .filter(|p| p.protocol == ExternalProtocol::Http)
        .count();
    let protocol = if http == ports.len() {
        v1::Protocol::Http
    } else if http == 0 {
        v1::Protocol::Tcp
    } else {
        v1::Protocol::Detect
    } as i32;
    let addresses: Vec<String> = if external.addresses.is_empty() {
        vec![host.to_owned()]
    } else {
        // Validation refused anything that is not an IP. No port: the call's (module docs).
        external
            .addresses
            .iter()
            .filter_map(|a| a.parse::<IpAddr>().ok())
            .map(|ip| match ip {
                IpAddr::V4(v4) => v4.to_string(),
                IpAddr::V6(v6) => format!("[{v6}]"),
            })
            .collect()
    };
    let endpoints = addresses
        .into_iter()
        .map(|address| v1::Endpoint {
            address,
            identity: String::new(),
            labels: Default::default(),
            weight: 0,
            protocol: v1::Protocol::Unspecified as i32,
        })
        .collect();
    let workload = v1::WorkloadRef {
        kind: WORKLOAD_KIND.into(),
        name: name.clone(),
        namespace: namespace.to_owned(),
    };
    let allowed: BTreeSet<String> = external
        .sources
        .iter()
        .map(|s| {
            if s.is_anyone() {
                // The proxy's spelling of "any caller with a mesh identity".
                return "*".to_string();
            }
            let source_ns = s.namespace.as_deref().unwrap_or(namespace);
            WorkloadIdentity::new(source_ns, &s.name).spiffe_id(trust_domain)
        })
        .collect();
    let mut declared: Vec<v1::ExternalPort> = ports
        .iter()
        .map(|p| v1::ExternalPort {
            port: u32::from(p.port),
            originate_tls_port: p
                .originate_tls
                .as_ref()
                .map_or(0, |tls| u32::from(tls.port)),
        })
        .collect();
    declared.sort_by_key(|p| p.port);
    v1::DestinationProfile {
        authority: host.to_owned(),
        protocol,
        balancer: v1::Balancer::Unspecified as i32,
        backends: vec![v1::Backend {
            name: name.clone(),
            weight: 1,
            endpoints,
            workload: Some(workload.clone()),
        }],
        workload: Some(workload),
        external: Some(v1::ExternalService {
            name: external_name(external),
            allowed_identities: allowed.into_iter().collect(),
            ports: declared,
            ca_bundle: external.ca_bundle.clone().unwrap_or_default(),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::policy::tests::view;

    const PAYMENTS: &str = "---
apiVersion: policy.trellis.io/v1alpha1
kind: ExternalService
metadata: {name: payments, namespace: shop}
spec:
  hosts: [api.pay.example]
  ports:
  - {port: 443, protocol: tls}
  - {port: 80, protocol: http, originateTls: {port: 8443}}
  - {port: 5432, protocol: tcp}
  sources:
  - {kind: ServiceAccount, name: checkout}
  - {kind: ServiceAccount, name: billing, namespace: finance}
";

    fn profile_of(kind: v1::destination_update::Kind) -> v1::DestinationProfile {
        match kind {
            v1::destination_update::Kind::Profile(p) => p,
            other => panic!("expected a profile, got {other:?}"),
        }
    }

    #[test]
    fn the_wildcard_source_admits_every_workload_of_the_mesh() {
        let yaml = PAYMENTS.replace(
            "  - {kind: ServiceAccount, name: checkout}\n",
            "  - {kind: ServiceAccount, name: \"*\", namespace: \"*\"}\n",
        );
        let view = view(&yaml);
        let p = profile_of(resolve(&view, "api.pay.example", "cluster.local"));
        assert_eq!(
            p.external.unwrap().allowed_identities,
            ["*", "spiffe://cluster.local/ns/finance/sa/billing"],
            "the proxy's spelling of any caller with a mesh identity"
        );
    }

    #[test]
    fn a_host_is_one_destination_with_its_ports_and_the_sources_identities() {
        let view = view(PAYMENTS);
        let p = profile_of(resolve(&view, "api.pay.example", "cluster.local"));
        assert_eq!(p.authority, "api.pay.example");
        assert_eq!(
            p.protocol,
            v1::Protocol::Detect as i32,
            "http and tls ports: HTTP detected, TLS passed through"
        );
        assert_eq!(p.backends.len(), 1);
        assert_eq!(p.backends[0].name, "payments");
        let endpoint = &p.backends[0].endpoints[0];
        assert_eq!(
            (endpoint.address.as_str(), endpoint.identity.as_str()),
            ("api.pay.example", ""),
            "no port: the proxy connects to the port called"
        );
        let workload = p.workload.unwrap();
        assert_eq!(
            (
                workload.kind.as_str(),
                workload.name.as_str(),
                workload.namespace.as_str()
            ),
            ("externalservice", "payments", "shop")
        );
        let external = p.external.unwrap();
        assert_eq!(external.name, "shop/payments");
        assert_eq!(
            external.allowed_identities,
            [
                "spiffe://cluster.local/ns/finance/sa/billing",
                "spiffe://cluster.local/ns/shop/sa/checkout",
            ]
        );
        let ports: Vec<(u32, u32)> = external
            .ports
            .iter()
            .map(|p| (p.port, p.originate_tls_port))
            .collect();
        assert_eq!(
            ports,
            [(80, 8443), (443, 0), (5432, 0)],
            "TLS originated from 80 to 8443; 443 and 5432 as sent"
        );
        assert_eq!(external.ca_bundle, "", "the system's roots");
    }

    #[test]
    fn identities_are_in_the_configured_trust_domain() {
        let view = view(PAYMENTS);
        let p = profile_of(resolve(&view, "api.pay.example", "mesh.example"));
        assert!(
            p.external
                .unwrap()
                .allowed_identities
                .contains(&"spiffe://mesh.example/ns/shop/sa/checkout".to_owned())
        );
    }

    #[test]
    fn a_source_not_listed_gets_no_identity() {
        let view = view(PAYMENTS);
        let p = profile_of(resolve(&view, "api.pay.example", "cluster.local"));
        let allowed = p.external.unwrap().allowed_identities;
        assert_eq!(allowed.len(), 2);
        assert!(!allowed.contains(&"spiffe://cluster.local/ns/shop/sa/web".to_owned()));
        assert!(
            !allowed.contains(&"spiffe://cluster.local/ns/shop/sa/billing".to_owned()),
            "billing is allowed from finance only, not from the ExternalService's namespace"
        );
    }

    #[test]
    fn fixed_addresses_replace_the_host_without_a_port() {
        let yaml = PAYMENTS.replace(
            "  sources:",
            "  addresses: [203.0.113.7, \"2001:db8::7\"]\n  sources:",
        );
        let view = view(&yaml);
        let p = profile_of(resolve(&view, "api.pay.example", "cluster.local"));
        let addresses: Vec<&str> = p.backends[0]
            .endpoints
            .iter()
            .map(|e| e.address.as_str())
            .collect();
        assert_eq!(addresses, ["203.0.113.7", "[2001:db8::7]"]);
    }

    #[test]
    fn an_undeclared_host_is_not_found() {
        let view = view(PAYMENTS);
        match resolve(&view, "other.pay.example", "cluster.local") {
            v1::destination_update::Kind::NotFound(nf) => assert_eq!(
                nf.reason,
                "other.pay.example is no mesh service and no ExternalService declares it"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn external_ports_are_the_named_ports_sorted_once_without_tcp() {
        let other = "---
apiVersion: policy.trellis.io/v1alpha1
kind: ExternalService
metadata: {name: mail, namespace: ops}
spec:
  hosts: [smtp.mail.example]
  ports:
  - {port: 443, protocol: tls}
  - {port: 25, protocol: tcp}
  sources:
  - {kind: ServiceAccount, name: notifier}
";
        let view = view(&format!("{PAYMENTS}{other}"));
        assert_eq!(external_ports(&view), [80, 443]);
        assert_eq!(
            external_ports(&crate::index::policy::tests::view("")),
            Vec::<u32>::new()
        );
    }

    #[test]
    fn a_mesh_service_name_wins_and_is_reported() {
        let yaml = PAYMENTS.replace(
            "hosts: [api.pay.example]",
            "hosts: [api.pay.example, web.shop, cart.shop.svc.cluster.local]",
        );
        let view = view(&yaml);
        assert!(
            view.externals
                .contains_key(&("api.pay.example".into(), 443))
        );
        assert!(!view.externals.keys().any(|(h, _)| h != "api.pay.example"));
        let problems: Vec<String> = view
            .problems
            .iter()
            .map(|p| format!("{} @ {}: {}", p.resource, p.location, p.message))
            .collect();
        assert_eq!(
            problems,
            [
                "ExternalService shop/payments @ test.yaml:2: spec.hosts[1]: web.shop is a mesh service name (name.namespace): the mesh service wins, this host is not served as external",
                "ExternalService shop/payments @ test.yaml:2: spec.hosts[2]: cart.shop.svc.cluster.local is a mesh service name (name.namespace): the mesh service wins, this host is not served as external",
            ]
        );
        assert!(is_mesh_name("web"));
        assert!(is_mesh_name("web.shop"));
        assert!(is_mesh_name("web.service.consul"));
        assert!(!is_mesh_name("api.pay.example"));
    }

    #[test]
    fn a_fixed_address_on_a_declared_port_is_the_external_service_and_nothing_else_is() {
        let yaml = PAYMENTS.replace("  sources:", "  addresses: [203.0.113.7]\n  sources:");
        let view = view(&yaml);
        let p = profile_of(resolve_address(
            &view,
            "203.0.113.7:5432".parse().unwrap(),
            "cluster.local",
        ));
        assert_eq!(p.authority, "203.0.113.7:5432");
        assert_eq!(p.protocol, v1::Protocol::Tcp as i32);
        assert_eq!(
            p.backends[0].endpoints[0].address, "203.0.113.7",
            "the port is the call's"
        );
        assert_eq!(p.external.unwrap().allowed_identities.len(), 2);
        for addr in ["203.0.113.7:6543", "203.0.113.8:5432"] {
            assert!(
                matches!(
                    resolve_address(&view, addr.parse().unwrap(), "cluster.local"),
                    v1::destination_update::Kind::NotFound(_)
                ),
                "{addr}"
            );
        }
    }

    #[test]
    fn a_fixed_address_two_external_services_list_is_reported_and_denies_every_caller() {
        let with_address = PAYMENTS.replace("  sources:", "  addresses: [203.0.113.7]\n  sources:");
        let other = "---
apiVersion: policy.trellis.io/v1alpha1
kind: ExternalService
metadata: {name: db, namespace: data}
spec:
  hosts: [db.data.example]
  ports:
  - {port: 5432, protocol: tcp}
  addresses: [203.0.113.7]
  sources:
  - {kind: ServiceAccount, name: reporting}
";
        let view = view(&format!("{with_address}{other}"));
        let reported: Vec<&str> = view
            .problems
            .iter()
            .filter(|p| {
                p.message
                    .starts_with("spec.addresses: 203.0.113.7:5432 is also listed by")
            })
            .map(|p| p.resource.as_str())
            .collect();
        assert_eq!(
            reported,
            ["ExternalService data/db", "ExternalService shop/payments"]
        );
        let p = profile_of(resolve_address(
            &view,
            "203.0.113.7:5432".parse().unwrap(),
            "cluster.local",
        ));
        assert!(p.external.unwrap().allowed_identities.is_empty());
        // The address on a port only one of them declares is not in conflict.
        let p = profile_of(resolve_address(
            &view,
            "203.0.113.7:443".parse().unwrap(),
            "cluster.local",
        ));
        assert_eq!(p.external.unwrap().allowed_identities.len(), 2);
    }

    #[test]
    fn two_declarations_of_one_host_are_reported_on_both_and_deny_every_caller() {
        // On another port of the same host: still one destination, so still a conflict.
        let other = "---
apiVersion: policy.trellis.io/v1alpha1
kind: ExternalService
metadata: {name: pay-legacy, namespace: legacy}
spec:
  hosts: [api.pay.example]
  ports:
  - {port: 8443, protocol: tls}
  sources:
  - {kind: ServiceAccount, name: old-checkout}
";
        let view = view(&format!("{PAYMENTS}{other}"));
        let mut problems: Vec<String> = view
            .problems
            .iter()
            .map(|p| format!("{} @ {}: {}", p.resource, p.location, p.message))
            .collect();
        problems.sort();
        assert_eq!(
            problems,
            [
                "ExternalService legacy/pay-legacy @ test.yaml:15: api.pay.example is also declared by ExternalService shop/payments (at test.yaml:2): nobody may call it until one declaration is removed",
                "ExternalService shop/payments @ test.yaml:2: api.pay.example is also declared by ExternalService legacy/pay-legacy (at test.yaml:15): nobody may call it until one declaration is removed",
            ]
        );
        let p = profile_of(resolve(&view, "api.pay.example", "cluster.local"));
        assert_eq!(
            p.external.unwrap().allowed_identities,
            Vec::<String>::new(),
            "empty = none may"
        );
    }
}
