//! The SMI spec's own example shapes (tests/data/examples), one file per kind family and version:
//! each loads without error, converts to the normalized model and back to its own version
//! unchanged, and survives a trip through every other version of its kind.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use trellis_smi::convert::{SmiObject, convert};
use trellis_smi::load::{LoadedResource, load_paths};
use trellis_smi::model::{Kind, Policy, Weight};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/examples")
}

fn load_all() -> Vec<LoadedResource> {
    let report = load_paths(&[examples_dir()]);
    let errors: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
    assert!(
        errors.is_empty(),
        "examples must load cleanly:\n{}",
        errors.join("\n")
    );
    report.resources
}

fn find<'a>(
    resources: &'a [LoadedResource],
    namespace: &str,
    name: &str,
    kind: Kind,
) -> &'a LoadedResource {
    resources
        .iter()
        .find(|r| {
            let id = r.policy.id();
            id.namespace == namespace && id.name == name && r.object.kind() == kind
        })
        .unwrap_or_else(|| panic!("{kind} {namespace}/{name} is among the examples"))
}

#[test]
fn every_kind_and_version_has_an_example() {
    let seen: BTreeSet<(Kind, &str)> = load_all()
        .iter()
        .map(|r| (r.object.kind(), r.object.version()))
        .collect();
    let all: BTreeSet<(Kind, &str)> = Kind::ALL
        .iter()
        .flat_map(|k| k.versions().iter().map(move |v| (*k, *v)))
        .collect();
    assert_eq!(seen, all);
}

#[test]
fn every_example_round_trips_through_the_model_and_every_version() {
    for resource in load_all() {
        let at = &resource.source;
        let own = SmiObject::from_policy(&resource.policy, resource.object.version()).unwrap();
        assert_eq!(
            own, resource.object,
            "{at}: model -> own version changes the object"
        );
        for version in resource.object.kind().versions() {
            let other = SmiObject::from_policy(&resource.policy, version).unwrap();
            let back = other.to_policy().unwrap();
            assert_eq!(
                back, resource.policy,
                "{at}: a trip through {version} changes the policy"
            );
            // The same through JSON, as the conversion webhook sees it.
            let json = convert(&resource.object.to_value(), &other.api_version()).unwrap();
            let again = convert(&json, &resource.object.api_version()).unwrap();
            assert_eq!(
                again,
                resource.object.to_value(),
                "{at}: JSON trip through {version}"
            );
        }
    }
}

#[test]
fn quantity_weights_keep_their_ratio_in_integer_versions() {
    let resources = load_all();
    let canary = find(&resources, "split-v1alpha1", "canary", Kind::TrafficSplit);
    let Policy::TrafficSplit(split) = &canary.policy else {
        panic!("a split")
    };
    let weights: Vec<Weight> = split.backends.iter().map(|b| b.weight).collect();
    assert_eq!(weights, [Weight(1000), Weight(500)]);
    let v4 = convert(&canary.object.to_value(), "split.smi-spec.io/v1alpha4").unwrap();
    assert_eq!(v4["spec"]["backends"][0]["weight"], 2);
    assert_eq!(v4["spec"]["backends"][1]["weight"], 1);
    assert_eq!(
        v4["metadata"]["annotations"]["split.smi-spec.io/trellis-weights"],
        r#"["1","500m"]"#
    );
}

#[test]
fn matches_survive_v1alpha2() {
    let resources = load_all();
    let ab = find(&resources, "split-v1alpha4", "ab-test", Kind::TrafficSplit);
    let v2 = convert(&ab.object.to_value(), "split.smi-spec.io/v1alpha2").unwrap();
    assert!(
        v2["spec"].get("matches").is_none(),
        "v1alpha2 has no matches field"
    );
    let v4 = convert(&v2, "split.smi-spec.io/v1alpha4").unwrap();
    assert_eq!(v4["spec"]["matches"][0]["name"], "ab-test");
    assert_eq!(v4, ab.object.to_value());
}

#[test]
fn destination_port_is_never_dropped() {
    let resources = load_all();
    let target = find(
        &resources,
        "access-v1alpha1",
        "path-specific",
        Kind::TrafficTarget,
    );
    let v3 = convert(&target.object.to_value(), "access.smi-spec.io/v1alpha3").unwrap();
    assert_eq!(
        v3["metadata"]["annotations"]["access.smi-spec.io/trellis-destination-port"],
        "8080"
    );
    let policy = SmiObject::from_value(&v3).unwrap().to_policy().unwrap();
    let Policy::AccessPolicy(access) = policy else {
        panic!("an access policy")
    };
    assert_eq!(
        access.destination_port,
        Some(8080),
        "the v1alpha3 form still restricts to 8080"
    );
    // A broken port annotation is an error, not "all ports".
    let mut broken = v3.clone();
    broken["metadata"]["annotations"]["access.smi-spec.io/trellis-destination-port"] =
        "eighty".into();
    let err = convert(&broken, "access.smi-spec.io/v1alpha1").unwrap_err();
    assert!(
        err.to_string().contains("trellis-destination-port"),
        "{err}"
    );
}

#[test]
fn udp_rules_are_kept_out_of_legacy_versions_and_come_back() {
    let resources = load_all();
    let target = find(
        &resources,
        "access-v1alpha3",
        "protocol-specific",
        Kind::TrafficTarget,
    );
    let v2 = convert(&target.object.to_value(), "access.smi-spec.io/v1alpha2").unwrap();
    assert_eq!(
        v2["spec"]["rules"].as_array().unwrap().len(),
        1,
        "only the TCPRoute rule fits"
    );
    assert_eq!(
        convert(&v2, "access.smi-spec.io/v1alpha3").unwrap(),
        target.object.to_value()
    );
}

#[test]
fn header_map_form_is_read_and_list_form_written() {
    let resources = load_all();
    let group = find(
        &resources,
        "specs-v1alpha4",
        "header-filters",
        Kind::HttpRouteGroup,
    );
    let written = group.object.to_value();
    assert_eq!(
        written["spec"]["matches"][0]["headers"],
        // A YAML map has no order (its entries AND together): it is written sorted by name.
        serde_json::json!([{"cookie": "^(.*?;)?(type=insider)(;.*)?$"}, {"user-agent": ".*Android.*"}])
    );
    let v1 = convert(&written, "specs.smi-spec.io/v1alpha1").unwrap();
    assert!(v1["matches"][0].get("headers").is_none());
    assert_eq!(convert(&v1, "specs.smi-spec.io/v1alpha4").unwrap(), written);
}

#[test]
fn udp_route_has_no_older_versions() {
    let resources = load_all();
    let udp = find(&resources, "specs-v1alpha4", "ftps", Kind::UdpRoute);
    let err = convert(&udp.object.to_value(), "specs.smi-spec.io/v1alpha3").unwrap_err();
    assert_eq!(
        err.to_string(),
        "UDPRoute has no version specs.smi-spec.io/v1alpha3"
    );
}
