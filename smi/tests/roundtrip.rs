//! Property tests: any valid policy survives a trip through every version of its kind, and any
//! object of any version survives a trip through the model and through every other version
//! (as JSON, the way the conversion webhook sees it).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use proptest::collection::{btree_map, btree_set, vec};
use proptest::prelude::*;
use std::collections::BTreeMap;
use trellis_smi::convert::{SmiObject, convert};
use trellis_smi::model::{
    AccessPolicy, AccessRule, HeaderMatch, HttpMatch, HttpRouteGroup, Identity, Policy, PortRoute,
    RouteGroupRef, RouteKind, SplitBackend, TrafficSplit, Weight,
};
use trellis_smi::validate::HTTP_METHODS;

fn name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,10}"
}

fn string_map() -> impl Strategy<Value = Option<BTreeMap<String, String>>> {
    // Kubernetes drops empty maps, so an object has either none or some; keys never use the
    // reserved `*.smi-spec.io/trellis-*` names.
    prop::option::of(btree_map("example\\.com/[a-z]{1,6}", "[ -~]{0,12}", 1..3))
}

fn metadata() -> impl Strategy<Value = ObjectMeta> {
    (name(), prop::option::of(name()), string_map(), string_map()).prop_map(
        |(name, namespace, labels, annotations)| ObjectMeta {
            name: Some(name),
            namespace,
            labels,
            annotations,
            ..Default::default()
        },
    )
}

fn weight() -> impl Strategy<Value = Weight> {
    prop_oneof![
        (0u64..1000).prop_map(Weight::units),       // whole units
        (0u64..1_000_000).prop_map(Weight),         // any milli value ("500m")
        (0u64..1_000_000_000_000).prop_map(Weight), // large
    ]
}

fn traffic_split() -> impl Strategy<Value = Policy> {
    (
        metadata(),
        name(),
        vec((name(), weight()), 1..5),
        vec(name(), 0..3),
    )
        .prop_map(|(metadata, service, backends, matches)| {
            Policy::TrafficSplit(TrafficSplit {
                metadata,
                service,
                backends: backends
                    .into_iter()
                    .map(|(service, weight)| SplitBackend { service, weight })
                    .collect(),
                matches: matches
                    .into_iter()
                    .map(|name| RouteGroupRef { name })
                    .collect(),
            })
        })
}

fn identity() -> impl Strategy<Value = Identity> {
    (name(), prop::option::of(name())).prop_map(|(name, namespace)| Identity {
        kind: "ServiceAccount".into(),
        name,
        namespace,
    })
}

fn access_policy() -> impl Strategy<Value = Policy> {
    let rule = (
        prop_oneof![
            Just(RouteKind::HttpRouteGroup),
            Just(RouteKind::TcpRoute),
            Just(RouteKind::UdpRoute)
        ],
        name(),
        prop::option::of(vec(name(), 0..3)),
    )
        .prop_map(|(kind, name, matches)| AccessRule {
            kind,
            name,
            matches,
        });
    (
        metadata(),
        identity(),
        prop::option::of(1u16..),
        vec(identity(), 1..3),
        vec(rule, 1..5),
    )
        .prop_map(
            |(metadata, destination, destination_port, sources, rules)| {
                Policy::AccessPolicy(AccessPolicy {
                    metadata,
                    destination,
                    destination_port,
                    sources,
                    rules,
                })
            },
        )
}

fn http_route_group() -> impl Strategy<Value = Policy> {
    let details = (
        prop::option::of("/[a-z]{0,5}(\\.\\*)?"),
        prop::option::of(prop::sample::subsequence(HTTP_METHODS.to_vec(), 0..4)),
        vec(("[a-z][a-z-]{0,8}", "[a-z.*]{0,6}"), 0..3),
    );
    // Match names are unique within a group (validation refuses duplicates).
    (metadata(), btree_set(name(), 0..4), vec(details, 4)).prop_map(|(metadata, names, details)| {
        let matches = names
            .into_iter()
            .zip(details)
            .map(|(name, (path_regex, methods, headers))| HttpMatch {
                name,
                path_regex,
                methods: methods.map(|m| m.into_iter().map(str::to_owned).collect()),
                headers: headers
                    .into_iter()
                    .map(|(name, value)| HeaderMatch { name, value })
                    .collect(),
            })
            .collect();
        Policy::HttpRouteGroup(HttpRouteGroup { metadata, matches })
    })
}

fn port_route() -> impl Strategy<Value = PortRoute> {
    (metadata(), vec(1u16.., 0..4)).prop_map(|(metadata, ports)| PortRoute { metadata, ports })
}

fn any_policy() -> impl Strategy<Value = Policy> {
    prop_oneof![
        traffic_split(),
        access_policy(),
        http_route_group(),
        port_route().prop_map(Policy::TcpRoute),
        port_route().prop_map(Policy::UdpRoute),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Model -> any version -> model changes nothing (weights, matches, ports, headers, rules).
    #[test]
    fn model_survives_every_version(policy in any_policy()) {
        for version in policy.kind().versions() {
            let object = SmiObject::from_policy(&policy, version).unwrap();
            prop_assert_eq!(&object.to_policy().unwrap(), &policy, "through {}", version);
            // And through the wire form of that version.
            let parsed = SmiObject::from_value(&object.to_value()).unwrap();
            prop_assert_eq!(&parsed, &object, "JSON of {}", version);
        }
    }

    /// Any object of any version -> model -> same version, and -> any other version -> back,
    /// as JSON through `convert` (what the webhook does), changes nothing.
    #[test]
    fn objects_survive_every_other_version(policy in any_policy()) {
        let versions = policy.kind().versions();
        for from in versions {
            let object = SmiObject::from_policy(&policy, from).unwrap();
            let value = object.to_value();
            let again = SmiObject::from_policy(&object.to_policy().unwrap(), from).unwrap();
            prop_assert_eq!(&again, &object, "{} -> model -> {}", from, from);
            for to in versions {
                let there = convert(&value, &format!("{}/{to}", policy.kind().group())).unwrap();
                let back = convert(&there, &object.api_version()).unwrap();
                prop_assert_eq!(&back, &value, "{} -> {} -> {}", from, to, from);
            }
        }
    }

    /// Quantity weights keep their exact ratio in integer versions.
    #[test]
    fn integer_versions_keep_weight_ratios(policy in traffic_split()) {
        let Policy::TrafficSplit(split) = &policy else { unreachable!() };
        let SmiObject::TrafficSplitV1Alpha4(v4) = SmiObject::from_policy(&policy, "v1alpha4").unwrap() else { unreachable!() };
        for (i, j) in (0..split.backends.len()).flat_map(|i| (0..split.backends.len()).map(move |j| (i, j))) {
            let (mi, mj) = (split.backends[i].weight.milli() as u128, split.backends[j].weight.milli() as u128);
            let (wi, wj) = (v4.spec.backends[i].weight.0 as u128, v4.spec.backends[j].weight.0 as u128);
            prop_assert_eq!(mi * wj, mj * wi, "ratio of backends {} and {}", i, j);
        }
    }

    /// A destination port is never lost: whatever version a target goes through, the policy the
    /// controller gets back restricts the same port.
    #[test]
    fn port_restrictions_are_never_widened(policy in access_policy()) {
        let Policy::AccessPolicy(original) = &policy else { unreachable!() };
        for version in policy.kind().versions() {
            let Policy::AccessPolicy(back) = SmiObject::from_policy(&policy, version).unwrap().to_policy().unwrap() else { unreachable!() };
            prop_assert_eq!(back.destination_port, original.destination_port);
        }
    }
}
