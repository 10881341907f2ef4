//! The generated CRDs: checked-in copies are fresh, they match the official SMI CRDs where they
//! must, and every example document (in every version it converts to) fits its version's schema.

use serde_json::Value;
use std::path::{Path, PathBuf};
use trellis_smi::convert::SmiObject;
use trellis_smi::crd::{self, GeneratedCrd};
use trellis_smi::load::load_paths;
use trellis_smi::model::Kind;

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn deploy_dir() -> PathBuf {
    manifest_dir().join("../deploy/crds")
}

/// The official CRD of an SMI kind; `None` for Trellis's own TrafficPolicy and ExternalService.
fn official_file(kind: Kind) -> Option<PathBuf> {
    let name = match kind {
        Kind::TrafficSplit => "split.yaml",
        Kind::TrafficTarget => "access.yaml",
        Kind::HttpRouteGroup => "httproutegroup.yaml",
        Kind::TcpRoute => "tcproute.yaml",
        Kind::UdpRoute => "udproute.yaml",
        Kind::TrafficPolicy | Kind::ExternalService => return None,
    };
    Some(official_dir().join(name))
}

/// The official SMI CRDs, vendored with their provenance and licence.
fn official_dir() -> PathBuf {
    manifest_dir().join("tests/data/official-crds")
}

fn as_json(crd: &GeneratedCrd) -> Value {
    serde_json::to_value(&crd.crd).unwrap()
}

fn version<'a>(crd: &'a Value, name: &str) -> &'a Value {
    crd["spec"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("version {name} exists"))
}

#[test]
fn checked_in_crds_are_fresh() {
    let mut expected_files = Vec::new();
    for generated in crd::generate() {
        let path = deploy_dir().join(&generated.file_name);
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == generated.to_yaml(),
            "{} is stale or missing: regenerate with `{}` (from the workspace root) and commit it",
            path.display(),
            crd::REGENERATE
        );
        expected_files.push(generated.file_name);
    }
    let (gateway_file, gateway_text) = crd::gateway_manifest();
    let path = deploy_dir().join(&gateway_file);
    assert!(
        std::fs::read_to_string(&path).unwrap_or_default() == gateway_text,
        "{} is stale or missing: regenerate with `{}` (from the workspace root) and commit it",
        path.display(),
        crd::REGENERATE
    );
    expected_files.push(gateway_file);
    let mut present: Vec<String> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    present.sort();
    expected_files.sort();
    assert_eq!(
        present, expected_files,
        "deploy/crds holds exactly the generated CRDs"
    );
}

#[test]
fn crds_match_the_official_ones() {
    for generated in crd::generate() {
        let kind = generated.kind;
        let ours = as_json(&generated);
        let Some(official_file) = official_file(kind) else {
            assert!(!kind.is_smi());
            continue;
        };
        let official: Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(official_file).unwrap()).unwrap();
        assert_eq!(
            ours["metadata"]["name"], official["metadata"]["name"],
            "{kind}: name"
        );
        for field in ["group", "names", "scope"] {
            assert_eq!(
                ours["spec"][field], official["spec"][field],
                "{kind}: spec.{field}"
            );
        }
        let stored = *kind.versions().last().unwrap();
        let (our_stored, official_stored) = (version(&ours, stored), version(&official, stored));
        assert_eq!(our_stored["storage"], true, "{kind}: {stored} is stored");
        assert_eq!(
            official_stored["storage"], true,
            "{kind}: the official file stores {stored} too"
        );
        assert_eq!(
            our_stored["schema"]["openAPIV3Schema"], official_stored["schema"]["openAPIV3Schema"],
            "{kind}: the schema of the stored version"
        );
        // Every version, ours and official: same printer columns wherever the official file has
        // the version.
        for version_name in kind.versions() {
            let ours_v = version(&ours, version_name);
            assert_eq!(ours_v["served"], true, "{kind} {version_name} is served");
            assert_eq!(
                ours_v["storage"],
                *version_name == stored,
                "{kind} {version_name} storage"
            );
            if let Some(official_v) = official["spec"]["versions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == *version_name)
            {
                assert_eq!(
                    ours_v["additionalPrinterColumns"], official_v["additionalPrinterColumns"],
                    "{kind} {version_name}: printer columns"
                );
            }
        }
        let webhook = &ours["spec"]["conversion"];
        assert_eq!(webhook["strategy"], "Webhook");
        assert_eq!(
            webhook["webhook"]["conversionReviewVersions"],
            serde_json::json!(["v1"])
        );
        assert_eq!(
            webhook["webhook"]["clientConfig"]["service"],
            serde_json::json!({"name": "trellis-controller", "namespace": "trellis-system", "path": "/convert", "port": 443})
        );
    }
}

#[test]
fn every_example_fits_the_schema_of_every_version_it_converts_to() {
    let crds: Vec<Value> = crd::generate().iter().map(as_json).collect();
    let schema_of = |kind: Kind, version_name: &str| -> jsonschema::Validator {
        let crd = crds
            .iter()
            .find(|c| c["spec"]["names"]["kind"] == kind.as_str())
            .unwrap();
        jsonschema::validator_for(&version(crd, version_name)["schema"]["openAPIV3Schema"]).unwrap()
    };
    let report = load_paths(&[manifest_dir().join("tests/data/examples")]);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let mut checked = 0;
    for resource in &report.resources {
        for version_name in resource.object.kind().versions() {
            let document = SmiObject::from_policy(&resource.policy, version_name)
                .unwrap()
                .to_value();
            let validator = schema_of(resource.object.kind(), version_name);
            let errors: Vec<String> = validator
                .iter_errors(&document)
                .map(|e| e.to_string())
                .collect();
            assert!(
                errors.is_empty(),
                "{} as {version_name} does not fit its schema: {errors:?}\n{document:#}",
                resource.source
            );
            checked += 1;
        }
    }
    assert!(
        checked > 90,
        "every example in every version ({checked} checks)"
    );
}

#[test]
fn the_schemas_reject_what_they_should() {
    // The generated schema is not vacuous: a negative-weight split and a bad method fail it.
    let crds: Vec<Value> = crd::generate().iter().map(as_json).collect();
    let split = crds
        .iter()
        .find(|c| c["spec"]["names"]["kind"] == "TrafficSplit")
        .unwrap();
    let validator =
        jsonschema::validator_for(&version(split, "v1alpha4")["schema"]["openAPIV3Schema"])
            .unwrap();
    assert!(
        !validator.is_valid(&serde_json::json!({"spec": {"service": "web"}})),
        "backends are required"
    );
    let groups = crds
        .iter()
        .find(|c| c["spec"]["names"]["kind"] == "HTTPRouteGroup")
        .unwrap();
    let validator =
        jsonschema::validator_for(&version(groups, "v1alpha4")["schema"]["openAPIV3Schema"])
            .unwrap();
    assert!(!validator.is_valid(
        &serde_json::json!({"spec": {"matches": [{"name": "x", "methods": ["FETCH"]}]}})
    ));
    assert!(
        !validator.is_valid(
            &serde_json::json!({"spec": {"matches": [{"name": "x", "headers": {"a": "b"}}]}})
        ),
        "map-form headers are not the CRD's form"
    );
}

#[test]
fn the_traffic_policy_crd_is_one_stored_version_with_a_derived_schema_and_no_defaults() {
    let generated = crd::generate()
        .into_iter()
        .find(|c| c.kind == Kind::TrafficPolicy)
        .unwrap();
    assert_eq!(
        generated.file_name,
        "trafficpolicies.policy.trellis.io.yaml"
    );
    let crd = as_json(&generated);
    assert_eq!(crd["spec"]["group"], "policy.trellis.io");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(
        crd["spec"]["names"]["shortNames"],
        serde_json::json!(["tp"])
    );
    assert!(
        crd["spec"]["conversion"].is_null(),
        "one version: nothing to convert"
    );
    let v1 = version(&crd, "v1alpha1");
    assert_eq!(
        (&v1["served"], &v1["storage"]),
        (&Value::Bool(true), &Value::Bool(true))
    );
    let text = serde_json::to_string(&v1["schema"]).unwrap();
    assert!(
        !text.contains("\"default\""),
        "defaults stay out of stored objects: {text}"
    );
    let validator = jsonschema::validator_for(&v1["schema"]["openAPIV3Schema"]).unwrap();
    let good = serde_json::json!({"spec": {
        "targetRef": {"name": "web"},
        "timeouts": {"request": "2s"},
        "retries": {"attempts": 2, "on": ["gateway-error"]},
        "outlierDetection": {"consecutiveFailures": 5, "failures": "5xx"},
        "loadBalancer": "leastRequest",
        "routes": [
            {"httpRouteGroup": "web-routes", "matches": ["api"], "rateLimit": {"requestsPerSecond": 10}},
            {"httpRouteGroup": "web-routes", "matches": ["admin"], "claims": [{"claim": "role", "values": ["admin"]}]},
        ],
        "jwt": {"required": true, "providers": [{"issuer": "https://i", "audiences": ["web"], "jwks": {"file": "/k.json"}, "algorithms": ["ES256"], "clockSkew": "30s"}]},
        "claims": [{"claim": "aud", "values": ["web"]}],
    }});
    assert!(
        validator.is_valid(&good),
        "{:?}",
        validator
            .iter_errors(&good)
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
    );
    for bad in [
        serde_json::json!({"spec": {"timeouts": {"request": "2s"}}}),
        serde_json::json!({"spec": {"targetRef": {"name": "web"}, "retries": {"attempts": "two"}}}),
        serde_json::json!({"spec": {"targetRef": {"name": "web"}, "loadBalancer": "random"}}),
        serde_json::json!({"spec": {"targetRef": {"name": "web"}, "routes": [{"matches": ["api"]}]}}),
        serde_json::json!({"spec": {"targetRef": {"name": "web"}, "claims": [{"claim": "role"}]}}),
        serde_json::json!({"spec": {"targetRef": {"name": "web"}, "jwt": {"providers": [{"issuer": "https://i", "audiences": ["web"], "jwks": {"file": "/k"}, "algorithms": ["XS1"]}]}}}),
    ] {
        assert!(!validator.is_valid(&bad), "{bad}");
    }
}

#[test]
fn the_external_service_crd_is_one_stored_version_whose_schema_checks_the_shape() {
    let generated = crd::generate()
        .into_iter()
        .find(|c| c.kind == Kind::ExternalService)
        .unwrap();
    assert_eq!(
        generated.file_name,
        "externalservices.policy.trellis.io.yaml"
    );
    let crd = as_json(&generated);
    assert_eq!(crd["spec"]["group"], "policy.trellis.io");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert!(crd["spec"]["conversion"].is_null());
    let v1 = version(&crd, "v1alpha1");
    assert_eq!(
        (&v1["served"], &v1["storage"]),
        (&Value::Bool(true), &Value::Bool(true))
    );
    let validator = jsonschema::validator_for(&v1["schema"]["openAPIV3Schema"]).unwrap();
    let good = serde_json::json!({"spec": {
        "hosts": ["api.pay.example"],
        "ports": [{"port": 443, "protocol": "tls"}, {"port": 80, "protocol": "http", "originateTls": {"port": 443}}],
        "sources": [{"kind": "ServiceAccount", "name": "checkout"}],
    }});
    assert!(validator.is_valid(&good));
    for bad in [
        // No sources, no ports, an unknown protocol, a port out of range.
        serde_json::json!({"spec": {"hosts": ["a.b.c"], "ports": [{"port": 443, "protocol": "tls"}]}}),
        serde_json::json!({"spec": {"hosts": ["a.b.c"], "sources": []}}),
        serde_json::json!({"spec": {"hosts": ["a.b.c"], "ports": [{"port": 443, "protocol": "udp"}], "sources": []}}),
        serde_json::json!({"spec": {"hosts": ["a.b.c"], "ports": [{"port": 70000, "protocol": "tls"}], "sources": []}}),
    ] {
        assert!(!validator.is_valid(&bad), "{bad}");
    }
}
